"""Contract: read, readinto, write and fill give the same results and the same errors
whether a call takes the fast path (an int GPA, a bytes or bytearray buffer, a
route known without resolving, inside the region used last) or the general one
(here forced with an int subclass and memoryviews, which the fast path leaves
alone); and no two reads share the fast path's scratch buffers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem as gm
import guestmem.mover as mover_module
from conftest import BASE, MODES, REGION

TAG = 5
# Two adjacent regions, a gap, a third: misses, region switches and spans.
LAYOUT = [(BASE, REGION), (BASE + REGION, REGION), (BASE + 3 * REGION, REGION)]


class _Int(int):
    """An int the fast path does not take (``type(x) is int`` fails); the API accepts it."""


def _memory(mode: gm.TagMode) -> gm.GuestMemory:
    memory = gm.GuestMemory.from_layout(LAYOUT, tags=mode)
    rng = np.random.default_rng(3)
    for gpa, size in LAYOUT:
        memory.write(gpa, rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        if mode is not gm.TagMode.NONE:
            memory.set_tags(gpa, size, TAG)
    return memory


@pytest.fixture(params=MODES, ids=lambda m: m.name)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[gm.GuestMemory, gm.GuestMemory]]:
    """Two memories alike: one for the fast calls, one for the general ones."""
    fast, general = _memory(request.param), _memory(request.param)
    fast.dirty.start()
    general.dirty.start()
    yield fast, general
    fast.close()
    general.close()


# Near each region of LAYOUT and the gap (index 2), its edges included.
near = st.builds(
    lambda i, offset: BASE + i * REGION + offset, st.integers(0, 3), st.integers(-64, REGION + 64)
)
gpas = st.one_of(near, near, near, st.sampled_from([-1, 0, 2**63, 2**64 - 1, 2**64, 2**70]))
lengths = st.one_of(st.integers(0, 300), st.sampled_from([-1, 4095, 4096, 4097, REGION + 1]))
# Mostly calls the fast path takes, and some it must leave to the general path.
accesses = st.sampled_from([*gm.Access, *gm.Access, *gm.Access, "dma", None])
routes = st.sampled_from([None] * 6 + [*gm.Route, 1, True, "TCO"])
tags = st.sampled_from([None] * 6 + [TAG, 3, 16])
fill_bytes = st.sampled_from([0, 0x5A, 255] * 3 + [256, -1, True])
op_names = st.sampled_from(["read", "readinto", "write", "fill"])
calls = st.tuples(op_names, gpas, lengths, accesses, routes, tags, fill_bytes)


def _outcome(call: Callable[[], Any]) -> tuple[object, ...]:
    try:
        return ("ok", call())
    except Exception as error:  # the same type and message on both paths
        return ("error", type(error), str(error))


def _run(
    memory: gm.GuestMemory, op: str, gpa: int, n: int, byte: int, kw: dict[str, Any], fast: bool
) -> tuple[object, ...]:
    at, size = (gpa, n) if fast else (_Int(gpa), _Int(n))
    if op == "read":
        return _outcome(lambda: memory.read(at, size, **kw))
    if op == "fill":
        value = byte if fast or type(byte) is bool else _Int(byte)
        return _outcome(lambda: memory.fill(at, size, value, **kw))
    buffer = bytearray(max(n, 0))
    if op == "readinto":
        target = buffer if fast else memoryview(buffer)
        return (*_outcome(lambda: memory.readinto(at, target, **kw)), bytes(buffer))
    data = bytes(range(256)) * (max(n, 0) // 256 + 1)
    source: Any = data[: max(n, 0)] if fast else memoryview(data[: max(n, 0)])
    return _outcome(lambda: memory.write(at, source, **kw))


def _dirty(memory: gm.GuestMemory) -> list[int]:
    return [int(page) for page in memory.dirty.take().numbers]


def _contents(memory: gm.GuestMemory) -> list[bytes]:
    return [memory.read(gpa, size, route=gm.Route.TCO) for gpa, size in LAYOUT]


# Five times the lane's usual count: a call only reaches the fast path when
# every one of its arguments allows it.
@settings(max_examples=5 * settings().max_examples)
@given(st.lists(calls, min_size=1, max_size=6))
def test_fast_and_general_paths_agree(
    pair: tuple[gm.GuestMemory, gm.GuestMemory],
    ops: list[tuple[str, int, int, object, object, object, int]],
) -> None:
    fast, general = pair
    for op, gpa, n, access, route, tag, byte in ops:
        kw = {"access": access, "route": route, "tag": tag}
        for _ in range(2):  # the first may move the hot region there; the second then hits
            done = _run(fast, op, gpa, n, byte, kw, True)
            assert done == _run(general, op, gpa, n, byte, kw, False)
            assert _dirty(fast) == _dirty(general)
    assert _contents(fast) == _contents(general)


def test_closed_memory_refuses_the_fast_path() -> None:
    memory = gm.GuestMemory.anonymous(REGION, gpa=BASE, tags="none")
    memory.read(BASE, 64)  # the region is the hot one
    memory.close()
    for call in (
        lambda: memory.read(BASE, 64),
        lambda: memory.readinto(BASE, bytearray(64)),
        lambda: memory.write(BASE, bytes(64)),
        lambda: memory.fill(BASE, 64, 0),
    ):
        with pytest.raises(gm.ClosedError):
            call()


def test_a_read_reentered_on_its_thread_keeps_its_own_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal handler or finalizer may read between the native call and the copy out."""
    with gm.GuestMemory.anonymous(REGION, gpa=BASE, tags="none") as memory:
        memory.write(BASE, b"\x11" * 64)
        memory.write(BASE + 64, b"\x22" * 64)
        native = mover_module._hot_read
        inner: list[bytes] = []

        def reentering(*args: Any) -> int:
            status: int = native(*args)
            if not inner:
                inner.append(b"")  # the inner read does not re-enter again
                inner[0] = memory.read(BASE + 64, 64)
            return status

        monkeypatch.setattr(mover_module, "_hot_read", reentering)
        assert memory.read(BASE, 64) == b"\x11" * 64
        assert inner == [b"\x22" * 64]


def test_threads_reading_at_once_each_get_their_own_bytes() -> None:
    with gm.GuestMemory.anonymous(REGION, gpa=BASE, tags="auto") as memory:
        for i in range(8):
            memory.write(BASE + i * 256, bytes([i]) * 256)
        failures: list[int] = []

        def reader(i: int) -> None:
            for _ in range(2000):
                if memory.read(BASE + i * 256, 256) != bytes([i]) * 256:
                    failures.append(i)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
