"""A reference VMM on guestmem: KVM on arm64, guest RAM served by the library.

The library's proving ground, as rust-vmm's vmm-reference is for its crates:
a guest with MTE boots in memory guestmem owns, its devices and its debugger
reach that memory through guestmem's routes, and the VMM never dies of a tag
check. One concern per module: ``kvm_api`` (the ioctls), ``vcpu``, ``gic``,
``fdt`` (the device tree), ``boot`` (kernel, initrd), ``uart`` (the PL011),
``machine`` (putting them together and running), ``stage1`` (guest virtual
to physical), ``run_control`` (KVM's side of GDB run control; the protocol
is :mod:`guestmem.gdbstub`'s) and ``cli``. The library never
imports this package.
"""
