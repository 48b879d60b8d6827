"""The split virtqueue (guestmem.virtio) against a synthetic driver, in every tag mode.

Under HARDWARE (the arm64 lanes) the rings and buffers carry varied tags:
the native ring walk must never fault on them.
"""

from __future__ import annotations

import faulthandler
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem as gm
from conftest import BASE, HOLE, LANE, LAYOUT, REGION, died_of_sigsegv, needs_mte, run_child
from guestmem.virtio import DescriptorChain, SplitQueue, chain_read, chain_write
from virtq_driver import INDIRECT, NEXT, NO_INTERRUPT, WRITE, Driver

SIZE = 8
BUF = BASE + 0x4000  # buffers from here on
TABLE = BASE + 0x8000  # an indirect table
END = BASE + 2 * REGION  # the end of the two adjacent regions (then the hole)


def tag_everything(mem: gm.GuestMemory) -> None:
    """What a guest with MTE does to its memory: a different tag on every granule."""
    if mem.tag_mode is gm.TagMode.NONE:
        return
    for region in mem.regions:
        granules = region.size // gm.GRANULE
        mem.set_tags(region.gpa, region.size, (np.arange(granules) * 7 + 1) % 16)


@pytest.fixture
def driver(mem: gm.GuestMemory) -> Driver:
    tag_everything(mem)
    return Driver(mem, SIZE, BASE)


# ---- requests and their buffers -----------------------------------------------------


@pytest.mark.kernel
def test_direct_chain_pops_split_by_direction(driver: Driver) -> None:
    mem = driver.mem
    q = driver.queue()
    assert q.pop() is None
    mem.write(BUF, b"H" * 16)
    head = driver.add([(BUF, 16, False), (BUF + 0x100, 4096, True), (BUF + 0x2000, 1, True)])
    chain = q.pop()
    assert chain == DescriptorChain(
        head, ((BUF, 16),), ((BUF + 0x100, 4096), (BUF + 0x2000, 1)), 16, 4097
    )
    assert q.pop() is None
    assert chain_read(mem, chain) == b"H" * 16
    assert chain_write(mem, chain, b"d" * 4096 + b"\0") == 4097
    assert mem.read(BUF + 0x100, 4096) == b"d" * 4096
    assert q.push(chain.head, 4097) is True
    assert driver.used_idx() == 1
    assert driver.used_elem(0) == (head, 4097)
    assert gm.thread_tco() is False


@pytest.mark.kernel
def test_indirect_chain(driver: Driver) -> None:
    q = driver.queue()
    bufs = [(BUF, 16, False), (BUF + 16, 32, False), (BUF + 0x100, 512, True)]
    head = driver.add_indirect(bufs, TABLE)
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == ((BUF, 16), (BUF + 16, 32))
    assert chain.writable == ((BUF + 0x100, 512),)
    assert (chain.readable_len, chain.writable_len) == (48, 512)


def test_direct_descriptors_then_an_indirect_table(driver: Driver) -> None:
    driver.set_desc(0, BUF, 8, NEXT, 1, table=TABLE + 0x100)
    driver.set_desc(1, BUF + 8, 8, WRITE, table=TABLE + 0x100)
    driver.set_desc(2, BUF + 0x40, 4, NEXT, 3)
    driver.set_desc(3, TABLE + 0x100, 32, INDIRECT)
    driver.publish(2)
    chain = driver.queue().pop()
    assert chain is not None
    assert chain.readable == ((BUF + 0x40, 4), (BUF, 8)) and chain.writable == ((BUF + 8, 8),)


def test_chains_come_in_order_and_buffers_may_span_regions(driver: Driver) -> None:
    q = driver.queue()
    across = BASE + REGION - 8  # 8 bytes in the first region, 8 in the second
    heads = [driver.add([(across, 16, False)]), driver.add([(BUF, 0, True)])]
    first, second = q.pop(), q.pop()
    assert first is not None and second is not None
    assert [first.head, second.head] == heads
    assert first.readable == ((across, 16),) and second.writable == ((BUF, 0),)
    assert q.pop() is None
    driver.mem.write(across, bytes(range(16)))
    assert chain_read(driver.mem, first) == bytes(range(16))


def test_chain_write_fills_from_the_first_buffer_and_refuses_too_much(driver: Driver) -> None:
    mem = driver.mem
    mem.fill(BUF, 64, 0xEE)
    driver.add([(BUF, 4, True), (BUF + 32, 8, True)])
    chain = driver.queue().pop()
    assert chain is not None
    assert chain_write(mem, chain, b"abcdef") == 6
    assert mem.read(BUF, 4) == b"abcd" and mem.read(BUF + 32, 8) == b"ef" + b"\xee" * 6
    with pytest.raises(gm.LengthError):
        chain_write(mem, chain, b"x" * 13)
    with pytest.raises(gm.BufferTypeError):
        chain_write(mem, chain, "text")
    assert chain_read(mem, chain) == b""


# ---- notifications ----------------------------------------------------------------------


def test_notify_follows_no_interrupt_without_event_idx(driver: Driver) -> None:
    q = driver.queue()
    for _ in range(2):
        driver.add([(BUF, 1, True)])
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None
    assert q.push(a.head, 1) is True
    driver.set_avail_flags(NO_INTERRUPT)
    assert q.push(b.head, 0) is False
    assert driver.used_idx() == 2 and driver.used_elem(1) == (b.head, 0)


def test_event_idx_notifies_when_used_passes_used_event(driver: Driver) -> None:
    q = driver.queue(event_idx=True)
    driver.set_avail_flags(NO_INTERRUPT)  # ignored under EVENT_IDX
    driver.set_used_event(1)
    heads = [driver.add([(BUF, 1, True)]) for _ in range(3)]
    chains = [q.pop() for _ in heads]
    assert driver.avail_event() == 3  # the device publishes where it is
    assert q.pop() is None
    pushed = [q.push(c.head, 1) for c in chains if c is not None]
    assert pushed == [False, True, False]  # only the push that moved idx from 1 to 2


def test_sixteen_bit_indices_wrap(driver: Driver) -> None:
    q = driver.queue(event_idx=True)
    start = 0xFFFE
    q.set_indices(start, start)
    driver.avail_idx = start
    driver.set_used_event(0xFFFF)
    results = []
    for _ in range(4):
        head = driver.add([(BUF, 2, True)])
        chain = q.pop()
        assert chain is not None and chain.head == head
        results.append(q.push(head, 2))
    assert q.last_avail_idx == 2 and q.used_idx == 2 and driver.used_idx() == 2
    assert results == [False, True, False, False]
    assert driver.avail_event() == 2
    assert driver.used_elem(0xFFFF) == (1, 2)  # the second push, in slot 7 of 8


@pytest.mark.kernel
def test_the_callers_tco_survives_pops_and_pushes(driver: Driver) -> None:
    """The walk sets TCO for itself and puts back what it found, on every path."""
    q = driver.queue()
    driver.add([(BUF, 4, False)])
    with gm.unchecked():
        chain = q.pop()
        assert gm.thread_tco() is True
        assert chain is not None and q.push(chain.head, 0) is True
        assert q.pop() is None and gm.thread_tco() is True
        driver.publish(SIZE)  # malformed: the error path restores it too
        with pytest.raises(gm.VirtqueueError):
            q.pop()
        assert gm.thread_tco() is True
    assert gm.thread_tco() is False


@pytest.mark.kernel  # the fault also arrives from a real kernel
@needs_mte
def test_tagged_rings_are_walked_and_checks_stay_on_after() -> None:
    """Rings whose every granule carries another tag: the walk never faults, and a
    plain access afterwards still does (TCO was put back)."""
    result = run_child(
        """
import struct
import numpy as np
import guestmem as gm
from guestmem.virtio import SplitQueue
mem = gm.GuestMemory.anonymous(0x10000, gpa=0x40000000, tags="hardware")
mem.set_tags(0x40000000, 0x10000, (np.arange(0x1000) * 7 + 1) % 16)
desc, avail, used = 0x40000000, 0x40000100, 0x40000200
mem.write(desc, struct.pack("<QIHH", 0x40004000, 64, 1, 1))
mem.write(desc + 16, struct.pack("<QIHH", 0x40005000, 8, 2, 0))
mem.write(avail + 4, struct.pack("<H", 0))
mem.write(avail + 2, struct.pack("<H", 1))
q = SplitQueue(mem, 8, desc, avail, used, event_idx=True)
chain = q.pop()
assert chain.readable == ((0x40004000, 64),) and chain.writable == ((0x40005000, 8),)
q.push(chain.head, 8)
mem.write(avail + 4 + 2, struct.pack("<H", 9))
mem.write(avail + 2, struct.pack("<H", 2))
try:
    q.pop()
except gm.VirtqueueError:
    print("raised", flush=True)
assert struct.unpack("<H", mem.read(used + 2, 2))[0] == 1
assert not gm.thread_tco()
print("walked ok", flush=True)
mem.view(used, 16)[3]
print("not reached", flush=True)
"""
    )
    assert "raised" in result.stdout and "walked ok" in result.stdout, result.stderr
    assert "not reached" not in result.stdout
    assert died_of_sigsegv(result), (result.returncode, result.stderr)


# ---- malformed rings ------------------------------------------------------------------


def _loop(d: Driver) -> None:
    d.set_desc(0, BUF, 4, NEXT, 1)
    d.set_desc(1, BUF, 4, NEXT, 0)
    d.publish(0)


def _indirect_too_long(d: Driver) -> None:
    for i in range(SIZE + 1):
        d.set_desc(i, BUF, 4, NEXT if i < SIZE else 0, i + 1, table=TABLE)
    d.set_desc(0, TABLE, 16 * (SIZE + 1), INDIRECT)
    d.publish(0)


def _indirect_loop(d: Driver) -> None:
    d.set_desc(0, BUF, 4, NEXT, 1, table=TABLE)
    d.set_desc(1, BUF, 4, NEXT, 0, table=TABLE)
    d.set_desc(0, TABLE, 32, INDIRECT)
    d.publish(0)


def _head_out_of_range(d: Driver) -> None:
    d.publish(SIZE)


def _next_out_of_range(d: Driver) -> None:
    d.set_desc(0, BUF, 4, NEXT, SIZE)
    d.publish(0)


def _indirect_next_out_of_range(d: Driver) -> None:
    d.set_desc(0, BUF, 4, NEXT, 2, table=TABLE)
    d.set_desc(1, BUF, 4, 0, table=TABLE)
    d.set_desc(0, TABLE, 32, INDIRECT)
    d.publish(0)


def _buffer_in_hole(d: Driver) -> None:
    d.set_desc(0, HOLE + 0x10, 4)
    d.publish(0)


def _buffer_runs_into_hole(d: Driver) -> None:
    d.set_desc(0, END - 4, 8)
    d.publish(0)


def _buffer_wraps_address_space(d: Driver) -> None:
    d.set_desc(0, 2**64 - 4, 8)
    d.publish(0)


def _indirect_zero(d: Driver) -> None:
    d.set_desc(0, TABLE, 0, INDIRECT)
    d.publish(0)


def _indirect_not_16(d: Driver) -> None:
    d.set_desc(0, TABLE, 24, INDIRECT)
    d.publish(0)


def _indirect_outside(d: Driver) -> None:
    d.set_desc(0, HOLE, 32, INDIRECT)
    d.publish(0)


def _indirect_nested(d: Driver) -> None:
    d.set_desc(0, TABLE + 0x100, 16, INDIRECT, table=TABLE)
    d.set_desc(0, TABLE, 16, INDIRECT)
    d.publish(0)


def _indirect_with_next(d: Driver) -> None:
    d.set_desc(0, BUF, 4, 0, table=TABLE)
    d.set_desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    d.publish(0)


def _read_after_write(d: Driver) -> None:
    d.add([(BUF, 4, True), (BUF + 4, 4, False)])


def _read_after_empty_write(d: Driver) -> None:
    d.add([(BUF, 0, True), (BUF + 4, 4, False)])


def _avail_ahead(d: Driver) -> None:
    d.publish(0, idx=SIZE + 2)  # one chain was popped: SIZE + 1 ahead


def _avail_behind(d: Driver) -> None:
    d.publish(0, idx=0xFFFF)  # "behind" is 65535 ahead: as malformed


MALFORMED = {
    "loop": (_loop, "chain_too_long", 0),
    "indirect_too_long": (_indirect_too_long, "chain_too_long", SIZE),
    "indirect_loop": (_indirect_loop, "chain_too_long", 0),
    "head_out_of_range": (_head_out_of_range, "head_range", SIZE),
    "next_out_of_range": (_next_out_of_range, "desc_range", SIZE),
    "indirect_next_out_of_range": (_indirect_next_out_of_range, "desc_range", 2),
    "buffer_in_hole": (_buffer_in_hole, "buffer_range", 0),
    "buffer_runs_into_hole": (_buffer_runs_into_hole, "buffer_range", 0),
    "buffer_wraps": (_buffer_wraps_address_space, "buffer_range", 0),
    "indirect_zero": (_indirect_zero, "indirect_length", 0),
    "indirect_not_16": (_indirect_not_16, "indirect_length", 0),
    "indirect_outside": (_indirect_outside, "indirect_range", 0),
    "indirect_nested": (_indirect_nested, "indirect_nested", 0),
    "indirect_with_next": (_indirect_with_next, "indirect_next", 0),
    "read_after_write": (_read_after_write, "read_after_write", 2),
    "read_after_empty_write": (_read_after_empty_write, "read_after_write", 2),
    "avail_ahead": (_avail_ahead, "avail_ahead", SIZE + 2),
    "avail_behind": (_avail_behind, "avail_ahead", 0xFFFF),
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_ring_raises_and_needs_reset(driver: Driver, case: str) -> None:
    make, reason, index = MALFORMED[case]
    q = driver.queue(event_idx=True)
    ok = driver.add([(BUF, 4, False)])
    chain = q.pop()
    assert chain is not None and q.push(ok, 0) in (True, False)
    used_before = driver.used_ring()
    make(driver)
    with pytest.raises(gm.VirtqueueError) as caught:
        q.pop()
    err = caught.value
    assert isinstance(err, gm.GuestMemoryError) and isinstance(err, ValueError)
    assert (err.reason, err.index) == (reason, index), str(err)
    assert str(index) in str(err)
    assert q.needs_reset
    assert driver.used_ring() == used_before, "a malformed ring must not touch the used ring"
    assert gm.thread_tco() is False
    with pytest.raises(gm.VirtqueueError, match="needs a reset"):
        q.pop()
    with pytest.raises(gm.VirtqueueError, match="needs a reset") as again:
        q.push(ok, 0)
    assert again.value.reason == "needs_reset"
    assert driver.used_ring() == used_before
    q.reset()
    driver.zero()
    assert not q.needs_reset and q.pop() is None
    head = driver.add([(BUF, 4, True)])
    popped = q.pop()
    assert popped is not None and popped.head == head


def _layouts() -> Iterator[tuple[str, tuple[int, int, int]]]:
    desc, avail, used = BASE, BASE + 0x1000, BASE + 0x2000
    yield "desc_misaligned", (desc + 8, avail, used)
    yield "avail_misaligned", (desc, avail + 1, used)
    yield "used_misaligned", (desc, avail, used + 2)
    yield "desc_in_hole", (HOLE, avail, used)
    yield "avail_across_regions", (desc, BASE + REGION - 8, used)
    yield "used_past_the_end", (desc, avail, BASE + 4 * REGION - 16)
    yield "used_beyond_gpa_space", (desc, avail, 2**64)


@pytest.mark.parametrize(("case", "rings"), list(_layouts()), ids=[c for c, _ in _layouts()])
def test_misplaced_rings_are_refused(
    mem: gm.GuestMemory, case: str, rings: tuple[int, int, int]
) -> None:
    with pytest.raises(gm.VirtqueueError) as caught:
        SplitQueue(mem, SIZE, *rings)
    assert caught.value.reason == "ring_range"


@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32768 * 2])
def test_sizes_must_be_powers_of_two_up_to_32768(mem: gm.GuestMemory, size: int) -> None:
    with pytest.raises(gm.VirtqueueError, match="power of two"):
        SplitQueue(mem, size, BASE, BASE + 0x1000, BASE + 0x2000)


def test_largest_queue_fits(mem: gm.GuestMemory) -> None:
    with pytest.raises(gm.VirtqueueError, match="descriptor table"):
        SplitQueue(mem, 32768, BASE, BASE, BASE)  # 512 KiB of descriptors: not here
    with gm.GuestMemory.anonymous(2 << 20, BASE, tags=mem.tag_mode) as big:
        d = Driver(big, 32768, BASE)
        q = d.queue(event_idx=True)
        head = d.add([(BASE + (1 << 20), 1, False)])
        chain = q.pop()
        assert chain is not None and chain.head == head


def test_push_of_a_foreign_head_is_a_usage_error(driver: Driver) -> None:
    q = driver.queue()
    with pytest.raises(gm.UsageError):
        q.push(SIZE, 0)
    with pytest.raises(gm.LengthError):
        q.push(0, 2**32)
    assert not q.needs_reset and driver.used_idx() == 0


def test_closed_memory_is_refused(driver: Driver) -> None:
    q = driver.queue()
    driver.mem.close()
    with pytest.raises(gm.ClosedError):
        q.pop()
    with pytest.raises(gm.ClosedError):
        q.push(0, 0)


def test_dirty_log_sees_the_used_ring(driver: Driver) -> None:
    mem = driver.mem
    q = driver.queue()
    driver.add([(BUF, 1, True)])
    chain = q.pop()
    assert chain is not None
    mem.dirty.start()
    q.push(chain.head, 1)
    pages = mem.dirty.take()
    assert driver.used // pages.page in pages.numbers.tolist()


# ---- fuzz: random rings never crash, hang or return nonsense --------------------------

FUZZ_SIZES = [1, 2, 4, 8, 16]
SMALL = 17  # small draws are reduced modulo the queue size (+1): mostly valid, sometimes not


def _mostly(usual: st.SearchStrategy[int], rare: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """``usual`` nine times in ten: a random ring is otherwise nearly always refused at once."""
    return st.integers(0, 9).flatmap(lambda k: rare if k == 0 else usual)


# Addresses a descriptor may point at: RAM, a region's edge, the hole, the top of the space.
ADDRESSES = _mostly(
    st.one_of(st.sampled_from([BUF, BUF + 0x100, TABLE, END - 16]), st.integers(BASE, END - 1)),
    st.one_of(st.sampled_from([HOLE, BASE + 3 * REGION, 2**64 - 16]), st.integers(0, 2**64 - 1)),
)
LENGTHS = _mostly(
    st.one_of(st.sampled_from([0, 1, 4096]), st.integers(1, 20).map(lambda k: 16 * k)),
    st.one_of(st.just(2**32 - 1), st.integers(0, 2**32 - 1)),
)
FLAGS = _mostly(
    st.sampled_from([0, NEXT, NEXT | WRITE, WRITE, INDIRECT]),
    st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)),
)
SMALL_OR_ANY = _mostly(st.integers(0, SMALL), st.integers(0, 0xFFFF))
DESCRIPTOR = st.tuples(ADDRESSES, LENGTHS, FLAGS, SMALL_OR_ANY)


def _small(value: int, size: int) -> int:
    return value % (size + 1) if value <= SMALL else value


def _well_formed(mem: gm.GuestMemory, chain: DescriptorChain, size: int) -> None:
    assert 0 <= chain.head < size
    count = len(chain.readable) + len(chain.writable)
    assert 1 <= count <= size
    assert chain.readable_len == sum(n for _, n in chain.readable)
    assert chain.writable_len == sum(n for _, n in chain.writable)
    for gpa, n in chain.readable + chain.writable:
        if n:
            mem.translate(gpa, n)  # AddressError if any byte is not guest RAM


@given(
    size=st.sampled_from(FUZZ_SIZES),
    table=st.lists(DESCRIPTOR, min_size=16, max_size=16),
    indirect=st.lists(DESCRIPTOR, min_size=20, max_size=20),
    ring=st.lists(SMALL_OR_ANY, min_size=16, max_size=16),
    avail_idx=SMALL_OR_ANY,
    event_idx=st.booleans(),
)
@settings(max_examples=settings().max_examples * (5 if LANE == "host" else 1))
def test_fuzzed_rings_pop_chains_or_raise_virtqueue_error(
    fuzz_mem: gm.GuestMemory,
    size: int,
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    event_idx: bool,
) -> None:
    mem = fuzz_mem
    d = Driver(mem, size, BASE)
    for i, (addr, length, flags, nxt) in enumerate(table[:size]):
        d.set_desc(i, addr, length, flags, _small(nxt, size))
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        d.set_desc(i, addr, length, flags, _small(nxt, len(indirect)), table=TABLE)
    mem.write(d.avail + 4, struct.pack(f"<{size}H", *(_small(h, size) for h in ring[:size])))
    d.set_avail_idx(_small(avail_idx, size))
    q = d.queue(event_idx=event_idx)
    used_before = d.used_ring()
    faulthandler.dump_traceback_later(30, exit=True)  # a hang fails loudly, not forever
    try:
        for _ in range(size + 1):
            try:
                chain = q.pop()
            except gm.VirtqueueError:
                assert q.needs_reset
                break
            if chain is None:
                break
            _well_formed(mem, chain, size)
    finally:
        faulthandler.cancel_dump_traceback_later()
    after = d.used_ring()
    assert after[: len(after) - 2] == used_before[: len(after) - 2]  # only avail_event moves
    assert gm.thread_tco() is False


@pytest.fixture
def fuzz_mem(mode: gm.TagMode) -> Iterator[gm.GuestMemory]:
    """One memory per mode for every example (hypothesis reuses function fixtures)."""
    if LANE != "host" and mode is not gm.TagMode.HARDWARE:
        pytest.skip(
            "the host lane fuzzes the ring walk in SOFTWARE and NONE; under emulation "
            "(about 5 s an example) only HARDWARE, what the host cannot run"
        )
    with gm.GuestMemory.from_layout(LAYOUT, tags=mode) as memory:
        tag_everything(memory)
        yield memory


def test_the_benchmark_device_serves_the_right_blocks(mode: gm.TagMode, tmp_path: Path) -> None:
    """The virtio-blk loop that `bench_virtio.py` times reads the sectors asked for."""
    from guestmem.tools.bench import virtio_blk as vb

    content = np.random.default_rng(5).integers(0, 256, vb.FILE_SIZE, np.uint8).tobytes()
    disk = tmp_path / "disk.img"
    disk.write_bytes(content)
    with (
        gm.GuestMemory.anonymous(vb.MEMORY, vb.GPA, tags=mode) as mem,
        open(disk, "rb", buffering=0) as f,
    ):
        tag_everything(mem)
        driver = vb._Driver(mem, 4)
        device = vb._Device(mem, driver.queue(), f.fileno())
        for _ in range(3):
            first = driver.next_sector
            driver.post()
            assert device.serve() == 4 and driver.reap() == 4
            for k in range(4):
                at = (first + k * vb.BLOCK // vb.SECTOR) * vb.SECTOR
                assert mem.read(driver.data + k * vb.BLOCK, vb.BLOCK) == content[at : at + vb.BLOCK]
                assert mem.read(driver.status + k, 1) == bytes([vb.VIRTIO_BLK_S_OK])
