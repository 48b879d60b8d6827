"""The native boundary: the compiled core, reached only through typed functions.

This package is the only place that imports the compiled core
(``guestmem._gm``) and handles cffi's ``lib`` and ``ffi``; every other
module calls the functions and constants re-exported here. Its modules,
one concern each:

- :mod:`~guestmem._native.status`: statuses, and the typed exceptions they become;
- :mod:`~guestmem._native.thread`: the CPU's MTE, the thread's TCO and check mode,
  the enums' values (guestmem.kinds takes Route and TagMode from them);
- :mod:`~guestmem._native.mapping`: host mappings and pointers that keep them alive;
- :mod:`~guestmem._native.access`: spans, access requests, the fast path's
  ``gm_hot``, the bounce pool, tags and system-call I/O over spans;
- :mod:`~guestmem._native.space`: the native space of regions (``struct gm_space``),
  made once per GuestMemory;
- :mod:`~guestmem._native.virtq` and :mod:`~guestmem._native.stream`: the virtqueue
  and the migration codec, over a native space;
- :mod:`~guestmem._native.kvm`: the KVM ioctls of TagMode.KVM.
"""

from __future__ import annotations

from guestmem._native.access import (
    IO_FROM_GUEST,
    IO_INTO_GUEST,
    IO_MAX_IOV,
    OP_FILL,
    OP_READ,
    OP_STAGE,
    OP_WRITE,
    SCRATCH_SIZE,
    access_request,
    bounce_pool,
    closed_hot,
    entry_address,
    hot_fill,
    hot_read,
    hot_region,
    hot_write,
    io_span,
    io_spans,
    move_range,
    read_request,
    run_access,
    scratch,
    spans,
    tags_get,
    tags_set,
)
from guestmem._native.kvm import (
    kvm_add_memslot,
    kvm_check_extension,
    kvm_create_vm,
    kvm_enable_mte,
    kvm_open,
    kvm_tags_get,
    kvm_tags_set,
)
from guestmem._native.mapping import (
    NULL,
    address_of,
    byte_pointer,
    bytes_view,
    from_buffer,
    map_memory,
    mapping_keeps_tags,
    pointer_keeping,
    word_pointer,
)
from guestmem._native.space import SpaceEntry, native_space
from guestmem._native.status import ERR_ERRNO, ERR_VIRTQ, MISS, OK, check, last_errno, raise_for
from guestmem._native.stream import (
    NEED_MORE,
    Decoder,
    RecordKind,
    StreamStatus,
    checksum,
    stream_encode,
)
from guestmem._native.thread import (
    MODE_VALUES,
    ROUTE_VALUES,
    cpu_has_mte,
    enable_mte,
    probe_signal_tco,
    thread_check_mode,
    thread_tco,
    unchecked_enter,
    unchecked_exit,
    unchecked_thread_enter,
    unchecked_thread_exit,
)
from guestmem._native.virtq import (
    VIRTQ_HEADER,
    VIRTQ_MAX_SIZE,
    VirtqError,
    virtq_init,
    virtq_pop,
    virtq_push,
    virtq_reset,
    virtqueue,
    words,
)

__all__ = [
    "ERR_ERRNO",
    "ERR_VIRTQ",
    "IO_FROM_GUEST",
    "IO_INTO_GUEST",
    "IO_MAX_IOV",
    "MISS",
    "MODE_VALUES",
    "NEED_MORE",
    "NULL",
    "OK",
    "OP_FILL",
    "OP_READ",
    "OP_STAGE",
    "OP_WRITE",
    "ROUTE_VALUES",
    "SCRATCH_SIZE",
    "VIRTQ_HEADER",
    "VIRTQ_MAX_SIZE",
    "Decoder",
    "RecordKind",
    "SpaceEntry",
    "StreamStatus",
    "VirtqError",
    "access_request",
    "address_of",
    "bounce_pool",
    "byte_pointer",
    "bytes_view",
    "check",
    "checksum",
    "closed_hot",
    "cpu_has_mte",
    "enable_mte",
    "entry_address",
    "from_buffer",
    "hot_fill",
    "hot_read",
    "hot_region",
    "hot_write",
    "io_span",
    "io_spans",
    "kvm_add_memslot",
    "kvm_check_extension",
    "kvm_create_vm",
    "kvm_enable_mte",
    "kvm_open",
    "kvm_tags_get",
    "kvm_tags_set",
    "last_errno",
    "map_memory",
    "mapping_keeps_tags",
    "move_range",
    "native_space",
    "pointer_keeping",
    "probe_signal_tco",
    "raise_for",
    "read_request",
    "run_access",
    "scratch",
    "spans",
    "stream_encode",
    "tags_get",
    "tags_set",
    "thread_check_mode",
    "thread_tco",
    "unchecked_enter",
    "unchecked_exit",
    "unchecked_thread_enter",
    "unchecked_thread_exit",
    "virtq_init",
    "virtq_pop",
    "virtq_push",
    "virtq_reset",
    "virtqueue",
    "word_pointer",
    "words",
]
