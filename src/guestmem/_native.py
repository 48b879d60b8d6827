"""The compiled core, and the glue every module uses to call it.

The only place that handles cffi objects untyped.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from guestmem._gm import ffi, lib
from guestmem.errors import NativeOSError, TagRaceError, UnsupportedError

__all__ = ["check", "ffi", "lib", "pointer_keeping"]


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


def _holding(owner: object) -> Any:
    def release(_pointer: Any) -> None:
        del _pointer
        _ = owner

    return release


def pointer_keeping(address: int, owner: object) -> Any:
    """A ``uint8_t *`` at ``address`` that keeps ``owner`` alive as long as it lives.

    Buffers made from it (ffi.buffer, memoryview slices, numpy views) keep
    it, and so the mapping, alive: memory is never unmapped under a view.
    """
    return ffi.gc(ffi.cast("uint8_t *", address), _holding(owner))
