"""A reference VMM on guestmem: KVM on arm64, guest RAM served by the library.

The library's proving ground, as rust-vmm's vmm-reference is for its crates:
a guest with MTE boots in memory guestmem owns, its devices and its debugger
reach that memory through guestmem's routes, and the VMM never dies of a tag
check. One concern per module: ``kvm_binding`` (raw ioctls, its one binding
to the core), ``kvm_api`` (the ioctls), ``vcpu``, ``gate``, ``gic`` (the vGIC
and its interrupt lines), ``fdt`` (the device tree), ``boot`` (kernel,
initrd), ``config`` (what machine to build), ``builder`` (building it:
VM, RAM, vCPUs, vGIC, devices), ``mmio_bus`` (device windows),
``runner`` (running it: vCPU threads, pause, the run loop), ``outcome``
(how a run ended, typed), ``machine`` (the built parts with their runner),
``io_loop`` (ioeventfd kicks), ``machine_state`` with ``vcpu_state``, ``gic_state`` and
``state_codec`` (saved state), ``stage1`` (guest virtual to physical),
``run_control`` (KVM's side of GDB run control; the protocol is
:mod:`guestmem.gdbstub`'s), ``control`` (the control socket's typed
requests) and the migration modules. The devices are not here: the PL011,
virtio-blk, virtio-console and the virtio-mmio transport are the library's
(:mod:`guestmem.devices`), which this package builds and wires to KVM (a
virtio-mmio window and a GIC line per device). The library never imports
this package, and this package never imports the front ends
(``guestmem.tools``, which hold its command line): tests/test_layering.py.
"""
