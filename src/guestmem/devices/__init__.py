"""Device models on guestmem, apart from the transports that carry them.

Each device knows only guest memory, its queues (:mod:`guestmem.virtio`)
and an interrupt (:mod:`.interrupt`): it never knows the VMM, the bus it is
mapped on or the process that drives it, so the reference VMM serves it
over virtio-mmio and a vhost-user backend can serve the same object.

``virtio_device``
    :class:`VirtioDevice`, what any transport drives: identity, features,
    config space, activation with the rings, a kick per queue, reset, and
    the device's own saved state; the virtio status and ring feature bits.
``virtio_blk``, ``virtio_console``
    virtio-blk over a disk image (locked by ``disk_lock``) and
    virtio-console (one port, the guest's hvc0).
``virtio_mmio``, ``virtio_mmio_state``
    the virtio-mmio transport (version 2), one window per device, and its
    saved state.
``pl011``
    the PL011 UART's registers, driving an :class:`InterruptLine`.

Every device's saved state has one shape (:class:`guestmem.saved_state.Stateful`).
"""
