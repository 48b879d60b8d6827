"""Contract: every exception a public call raises is a GuestMemoryError
subclass, and keeps the builtin it resembles."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

import guestmem as gm
from conftest import BASE, HOLE

Call = Callable[[gm.GuestMemory], object]


def reentered(memory: gm.GuestMemory) -> None:
    mapping = memory.dma.map_segments(BASE, 16, gm.Direction.TO_DEVICE)
    with mapping:
        mapping.__enter__()


def exited_unentered(memory: gm.GuestMemory) -> None:
    memory.dma.map_segments(BASE, 16, gm.Direction.TO_DEVICE).__exit__(None, None, None)


def closed_fd(memory: gm.GuestMemory) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    memory.dma.io.read_from(fd, BASE, 16)


def nothing_to_receive(memory: gm.GuestMemory) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        memory.dma.io.recv_into(a, BASE, 16, route=gm.Route.BOUNCE)


def nothing_to_receive_natively(memory: gm.GuestMemory) -> None:
    a, b = socket.socketpair()
    with a, b:
        os.set_blocking(a.fileno(), False)
        memory.dma.io.read_from(a, BASE, 16)


def timed_out(memory: gm.GuestMemory) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(0.01)
        memory.dma.io.recv_into(a, BASE, 16)


def str_flags(memory: gm.GuestMemory) -> None:
    a, b = socket.socketpair()
    with a, b:
        memory.dma.io.recv_into(a, BASE, 4, "peek")  # type: ignore[arg-type]


def mixed_modes(memory: gm.GuestMemory) -> None:
    gm.GuestMemory(
        [
            gm.GuestRegion.anonymous(0, 0x1000, gm.TagMode.NONE),
            gm.GuestRegion.anonymous(0x1000, 0x1000, gm.TagMode.SOFTWARE),
        ]
    )


ERRORS: dict[str, tuple[type[BaseException], Call]] = {
    "unknown tag mode name": (ValueError, lambda m: gm.resolve_tag_mode("quantum")),
    "tag mode of the wrong type": (TypeError, lambda m: gm.resolve_tag_mode(3)),  # type: ignore[arg-type]
    "fill byte 256": (ValueError, lambda m: m.fill(BASE, 4, 256)),
    "fill byte -1": (ValueError, lambda m: m.fill(BASE, 4, -1)),
    "fill byte float": (TypeError, lambda m: m.fill(BASE, 4, 1.5)),  # type: ignore[arg-type]
    "Policy io=TCO": (ValueError, lambda m: gm.Policy(io=gm.Route.TCO)),
    "Policy dma=CHECKED": (ValueError, lambda m: gm.Policy(dma=gm.Route.CHECKED)),
    "Policy of strings": (TypeError, lambda m: gm.Policy(dma="tco")),  # type: ignore[arg-type]
    "policy not a Policy": (TypeError, lambda m: setattr(m, "policy", "fast")),
    "translate a str": (TypeError, lambda m: m.translate("0x40000000", 4)),  # type: ignore[arg-type]
    "translate a float length": (TypeError, lambda m: m.translate(BASE, 4.0)),  # type: ignore[arg-type]
    "read a float length": (TypeError, lambda m: m.read(BASE, 4.0)),  # type: ignore[arg-type]
    "read 2**64 bytes": (ValueError, lambda m: m.read(BASE, 2**64)),
    "read at 2**64": (ValueError, lambda m: m.read(2**64, 1)),
    "access a str": (TypeError, lambda m: m.read(BASE, 4, access="dma")),  # type: ignore[arg-type]
    "route 99": (ValueError, lambda m: m.read(BASE, 4, route=99)),  # type: ignore[arg-type]
    "route a str": (TypeError, lambda m: m.read(BASE, 4, route="tco")),  # type: ignore[arg-type]
    "readv of non-pairs": (TypeError, lambda m: m.readv([BASE])),  # type: ignore[list-item]
    "readv with a None length": (TypeError, lambda m: m.readv([(BASE, None)])),  # type: ignore[list-item]
    "get_tags float": (TypeError, lambda m: m.get_tags(float(BASE), 16)),  # type: ignore[arg-type]
    "find_region str": (TypeError, lambda m: m.find_region("x")),  # type: ignore[arg-type]
    "mixed tag modes": (ValueError, mixed_modes),
    "DmaMapping entered twice": (ValueError, reentered),
    "DmaMapping left unentered": (ValueError, exited_unentered),
    "direction a str": (TypeError, lambda m: m.dma.map(BASE, 4, "in").__enter__()),  # type: ignore[arg-type]
    "io on a closed fd": (OSError, closed_fd),
    "io on a non-fd": (TypeError, lambda m: m.dma.io.read_from("fd", BASE, 4)),  # type: ignore[arg-type]
    "recv_into a non-socket": (TypeError, lambda m: m.dma.io.recv_into(3, BASE, 4)),  # type: ignore[arg-type]
    "nothing to receive (BOUNCE)": (BlockingIOError, nothing_to_receive),
    "nothing to receive (native)": (BlockingIOError, nothing_to_receive_natively),
    "receive timed out": (TimeoutError, timed_out),
    "bounce pool of -1 buffers": (
        ValueError,
        lambda m: gm.GuestMemory(
            [gm.GuestRegion.anonymous(0, 0x1000, gm.TagMode.NONE)], bounce_buffers=-1
        ),
    ),
    "region at a str": (
        TypeError,
        lambda m: gm.GuestRegion.anonymous("0", 0x1000, gm.TagMode.NONE),  # type: ignore[arg-type]
    ),
    "region in a str mode": (
        TypeError,
        lambda m: gm.GuestRegion(0, 0x1000, "none", gm.Backing.ANONYMOUS),  # type: ignore[arg-type]
    ),
    "view into the hole": (ValueError, lambda m: m.view(HOLE, 4)),
    "layout of non-pairs": (TypeError, lambda m: gm.GuestMemory.from_layout([0x1000], tags="none")),  # type: ignore[list-item]
    "regions that are not regions": (TypeError, lambda m: gm.GuestMemory([(0, 0x1000)])),  # type: ignore[list-item]
    "recv_into with str flags": (TypeError, str_flags),
    "attach a dict": (TypeError, lambda m: gm.GuestMemory.attach([{"fd": 3}], tags="none")),  # type: ignore[list-item]
}


@pytest.mark.parametrize("case", list(ERRORS), ids=str)
def test_public_calls_raise_only_guest_memory_errors(mem: gm.GuestMemory, case: str) -> None:
    builtin, call = ERRORS[case]
    with pytest.raises(gm.GuestMemoryError) as caught:
        call(mem)
    assert isinstance(caught.value, builtin), f"{type(caught.value).__name__} is not a {builtin}"


def test_os_failures_making_a_tag_table_are_native_os_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_more_fds(*_: object) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_more_fds)
    with pytest.raises(gm.NativeOSError) as caught:
        gm.GuestMemory.memfd(0x10000, tags="software")
    assert caught.value.errno == 24


def test_the_new_errors_are_exported_with_their_builtins() -> None:
    assert issubclass(gm.UsageError, gm.GuestMemoryError) and issubclass(gm.UsageError, ValueError)
    assert issubclass(gm.ArgumentTypeError, gm.GuestMemoryError)
    assert issubclass(gm.ArgumentTypeError, TypeError)
    assert issubclass(gm.SharedTableError, ValueError)
    for name in ("UsageError", "ArgumentTypeError", "SharedTableError"):
        assert name in gm.__all__
