"""Native statuses, and the typed exceptions they become."""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence

from guestmem._gm import ffi, lib
from guestmem.errors import NativeOSError, TagCheckError, TagRaceError, UnsupportedError

OK: int = lib.GM_OK
MISS: int = lib.GM_MISS  # gm_hot_*: not a case for the fast path; nothing was done
ERR_ERRNO: int = lib.GM_ERR_ERRNO  # a system call failed: last_errno() says why
ERR_VIRTQ: int = lib.GM_ERR_VIRTQ


def last_errno() -> int:
    """The C errno the calling thread's last native call left."""
    return int(ffi.errno)


def raise_for(status: int, what: str, span_gpas: Sequence[int] = ()) -> None:
    """Raise the exception for a native status other than GM_OK (none for GM_OK).

    A tag-check failure becomes TagCheckError with the GPA of the first
    mismatching granule: ``span_gpas`` holds the first GPA of each span of
    the request that failed.
    """
    if status == lib.GM_ERR_TAG_CHECK:
        fault = ffi.new("struct gm_fault *")
        lib.gm_last_fault(fault)
        gpa = span_gpas[fault.span] + fault.offset if fault.span < len(span_gpas) else None
        raise TagCheckError(gpa, fault.logical_tag, fault.allocation_tag)
    check(status, what)


def check(status: int, what: str) -> None:
    """Turn a native status other than GM_OK into a typed exception."""
    if status == lib.GM_OK:
        return
    if status == lib.GM_ERR_UNSUPPORTED:
        raise UnsupportedError(f"{what}: not available in this tag mode or on this CPU")
    if status == lib.GM_ERR_RACE:
        raise TagRaceError(f"{what}: the guest kept changing tags under the access")
    code = ffi.errno or _errno.EIO
    raise NativeOSError(code, f"{what}: {os.strerror(code)}")
