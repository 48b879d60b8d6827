"""guestmem: guest RAM access for arm64 VMMs whose guests use MTE.

Every access to guest memory is classified (:class:`Access`) and carried out
by a native route (:class:`Route`) that never faults and never loses a tag.
"""

from __future__ import annotations

from guestmem.dma import Dma, DmaMapping
from guestmem.dma_io import DmaIO
from guestmem.errors import (
    AddressError,
    AlignmentError,
    ArgumentTypeError,
    BufferTypeError,
    ClosedError,
    ConvergenceError,
    GuestMemoryError,
    LengthError,
    NativeOSError,
    ProtocolError,
    SharedTableError,
    StreamError,
    TagCheckError,
    TagError,
    TagRaceError,
    TagsBusyError,
    UnsupportedError,
    UsageError,
    VirtqueueError,
)
from guestmem.kinds import Access, Direction, Policy, Route, TagMode
from guestmem.kvm import KvmVm, kvm_mte_available
from guestmem.memory import GuestMemory, resolve_tag_mode
from guestmem.platform import (
    CheckMode,
    available_tag_modes,
    has_mte,
    thread_check_mode,
    thread_tco,
)
from guestmem.platform import summary as platform_summary
from guestmem.region import PAGE_SIZE, Backing, GuestRegion, SharedRegion
from guestmem.scopes import unchecked, unchecked_thread
from guestmem.units import GRANULE, HOST_PAGE, STREAM_PAGE, Frames
from guestmem.virtio import DescriptorChain, SplitQueue

__version__ = "0.1.0"

__all__ = [
    "GRANULE",
    "HOST_PAGE",
    "PAGE_SIZE",
    "STREAM_PAGE",
    "Access",
    "AddressError",
    "AlignmentError",
    "ArgumentTypeError",
    "Backing",
    "BufferTypeError",
    "CheckMode",
    "ClosedError",
    "ConvergenceError",
    "DescriptorChain",
    "Direction",
    "Dma",
    "DmaIO",
    "DmaMapping",
    "Frames",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "KvmVm",
    "LengthError",
    "NativeOSError",
    "Policy",
    "ProtocolError",
    "Route",
    "SharedRegion",
    "SharedTableError",
    "SplitQueue",
    "StreamError",
    "TagCheckError",
    "TagError",
    "TagMode",
    "TagRaceError",
    "TagsBusyError",
    "UnsupportedError",
    "UsageError",
    "VirtqueueError",
    "__version__",
    "available_tag_modes",
    "has_mte",
    "kvm_mte_available",
    "platform_summary",
    "resolve_tag_mode",
    "thread_check_mode",
    "thread_tco",
    "unchecked",
    "unchecked_thread",
]
