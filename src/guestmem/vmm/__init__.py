"""A reference VMM on guestmem: KVM on arm64, guest RAM served by the library.

The library's proving ground, as rust-vmm's vmm-reference is for its crates:
a guest with MTE boots in memory guestmem owns, its devices and its debugger
reach that memory through guestmem's routes, and the VMM never dies of a tag
check. One concern per module: ``kvm_binding`` (raw ioctls, its one binding to
the core), ``kvm_api`` (the ioctls), ``vcpu``, ``gic``,
``fdt`` (the device tree), ``boot`` (kernel, initrd), ``uart`` (the PL011),
``machine`` (putting them together and running), ``stage1`` (guest virtual
to physical), ``debug`` (GDB run control) and ``control`` (the control
socket's typed requests). The library never imports this package, and this
package never imports the front ends (``guestmem.tools``, which hold its
command line): tests/test_layering.py.
"""
