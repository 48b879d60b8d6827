"""Save/restore: bit-exact data and tags in every mode, and every kind of bad
stream refused with its offset and reason, nothing written outside regions."""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import snapshot
from guestmem import migration

LAYOUT = [(0x4000_0000, 0x10000), (0x4001_0000, 0x8000)]
CORPUS = Path(__file__).parent / "corpus" / "stream"


def memory(mode: gm.TagMode) -> gm.GuestMemory:
    return gm.GuestMemory.from_layout(LAYOUT, tags=mode)


def scramble(mem: gm.GuestMemory, seed: int, share: float = 0.5) -> None:
    """Random data and tags on a random share of pages; the rest stays zero."""
    rng = np.random.default_rng(seed)
    for region in mem.regions:
        for page in range(region.size // 4096):
            if rng.random() < share:
                gpa = region.gpa + page * 4096
                mem.write(gpa, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
                if mem.tag_mode is not gm.TagMode.NONE and rng.random() < 0.7:
                    mem.set_tags(gpa, 4096, rng.integers(0, 16, 256).astype(np.uint8))


def saved(mem: gm.GuestMemory) -> bytes:
    out = io.BytesIO()
    migration.save(mem, out)
    return out.getvalue()


@pytest.mark.kernel  # KVM mode's round trip runs in the kernel lane
@given(seed=st.integers(0, 2**32 - 1), share=st.sampled_from([0.0, 0.5, 1.0]))
def test_round_trip_is_bit_exact(mode: gm.TagMode, seed: int, share: float) -> None:
    with memory(mode) as src, memory(mode) as dst:
        scramble(src, seed, share)
        totals = migration.restore(io.BytesIO(saved(src)), dst)
        assert totals.pages == sum(size for _, size in LAYOUT) // 4096
        before, after = snapshot(src), snapshot(dst)
        assert before[0] == after[0]
        for a, b in zip(before[1], after[1], strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_restore_marks_the_pages_it_wrote() -> None:
    # A memory that logs (e.g. a VMM forwarding what it restored) sees each page land.
    with memory(gm.TagMode.SOFTWARE) as src, memory(gm.TagMode.SOFTWARE) as dst:
        src.write(LAYOUT[1][0] + 4096, b"x")
        dst.dirty.start()
        migration.restore(io.BytesIO(saved(src)), dst)  # every page, zero ones too
        every = {at // gm.HOST_PAGE for lo, size in LAYOUT for at in range(lo, lo + size, 4096)}
        assert dst.dirty.take().numbers.tolist() == sorted(every)


def test_stream_sizes(tagged_mode: gm.TagMode) -> None:
    pages = sum(size for _, size in LAYOUT) // 4096
    with memory(tagged_mode) as mem:
        header = 28 + 16 * len(LAYOUT) + 8
        assert len(saved(mem)) == header + 16 * pages + 16  # all zero: 16 bytes a page
        mem.write(0x4000_0000, b"x")
        assert len(saved(mem)) == header + 16 * (pages - 1) + 4096 + 16 + 16
        mem.set_tags(0x4000_0000, 16, 3)
        assert len(saved(mem)) == header + 16 * (pages - 1) + 4096 + 128 + 16 + 16


def test_tags_cross_modes_and_none_refuses_them() -> None:
    with memory(gm.TagMode.SOFTWARE) as src, memory(gm.TagMode.NONE) as dst:
        src.write(0x4000_2000, b"plain")
        migration.restore(io.BytesIO(saved(src)), dst)
        assert dst.read(0x4000_2000, 5) == b"plain"
        src.set_tags(0x4000_3000, 16, 9)
        with pytest.raises(gm.StreamError, match="no tag storage"):
            migration.restore(io.BytesIO(saved(src)), dst)


def small_stream() -> bytes:
    with memory(gm.TagMode.SOFTWARE) as mem:
        mem.write(0x4000_0000, b"data" * 1000)
        mem.set_tags(0x4000_0000, 64, [1, 2, 3, 4])
        return saved(mem)


def test_every_corrupted_byte_is_detected() -> None:
    stream = small_stream()
    for position in range(len(stream)):
        damaged = bytearray(stream)
        damaged[position] ^= 0x5A
        with memory(gm.TagMode.SOFTWARE) as target, pytest.raises(gm.StreamError):
            migration.restore(io.BytesIO(bytes(damaged)), target)


def test_truncation_anywhere_is_detected() -> None:
    stream = small_stream()
    for cut in [0, 5, 40, 60, 100, len(stream) // 2, len(stream) - 1]:
        with memory(gm.TagMode.SOFTWARE) as target, pytest.raises(gm.StreamError, match="trunc"):
            migration.restore(io.BytesIO(stream[:cut]), target)


def header_with(
    regions: Sequence[tuple[int, int]] = LAYOUT, *, mode: int = 1, **changes: object
) -> bytes:
    fields = {"magic": b"GMSTREAM", "version": 1, "page": 4096, "granule": 16}
    fields["count"] = len(regions)
    fields.update(changes)
    body = struct.pack(
        "<8sHHIIB3sI",
        fields["magic"],
        fields["version"],
        0,
        fields["page"],
        fields["granule"],
        mode,
        b"\0\0\0",
        fields["count"],
    )
    body += b"".join(struct.pack("<QQ", g, s) for g, s in regions)
    return body + struct.pack("<Q", migration.header.checksum(body))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"magic": b"NOTMINE!"}, "magic"),
        ({"version": 2}, "version"),
        ({"page": 16384}, "page size"),
        ({"granule": 32}, "granule"),
        ({"count": 10**9}, "absurd region count"),
    ],
)
def test_bad_headers(changes: dict[str, Any], reason: str) -> None:
    with memory(gm.TagMode.SOFTWARE) as target:
        before = snapshot(target)
        with pytest.raises(gm.StreamError, match=reason) as caught:
            migration.restore(io.BytesIO(header_with(LAYOUT, **changes) + b"\0" * 64), target)
        assert caught.value.offset >= 0 and caught.value.reason
        assert snapshot(target)[0] == before[0]


def test_other_region_table_is_refused() -> None:
    other = gm.GuestMemory.anonymous(0x10000, gpa=0x4000_0000, tags="software")
    with memory(gm.TagMode.SOFTWARE) as src, other, pytest.raises(gm.StreamError, match="region"):
        migration.restore(io.BytesIO(saved(src)), other)


def page_record(pfn: int, flags: int = 3) -> bytes:
    head = (1 | (flags << 8) | (pfn << 16)).to_bytes(8, "little")
    return head + migration.header.checksum(head).to_bytes(8, "little")


def test_a_record_outside_the_regions_writes_nothing() -> None:
    stream = header_with() + page_record(0x5000_0000 // 4096)
    with memory(gm.TagMode.SOFTWARE) as target:
        target.fill(0x4000_0000, 0x10000, 0xAB)
        with pytest.raises(gm.StreamError, match="outside the declared regions") as caught:
            migration.restore(io.BytesIO(stream), target)
        assert caught.value.offset == len(header_with())
        assert target.read(0x4000_0000, 0x10000) == b"\xab" * 0x10000


def test_data_after_the_end_is_refused() -> None:
    with (
        memory(gm.TagMode.SOFTWARE) as target,
        pytest.raises(gm.StreamError, match="after the end"),
    ):
        migration.restore(io.BytesIO(small_stream() + b"junk"), target)


def test_inspect_reads_header_and_totals() -> None:
    header, totals = migration.inspect(io.BytesIO(small_stream()))
    assert header.regions == tuple(LAYOUT) and header.tag_mode is gm.TagMode.SOFTWARE
    assert totals.pages == 24 and totals.bytes == len(small_stream())


@given(data=st.binary(max_size=600), splice=st.integers(0, 200))
def test_fuzzed_streams_never_crash(data: bytes, splice: int) -> None:
    stream = small_stream()
    mutated = stream[:splice] + data + stream[splice + len(data) :]
    with memory(gm.TagMode.SOFTWARE) as target, contextlib.suppress(gm.StreamError):
        migration.restore(io.BytesIO(mutated), target)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_corpus(path: Path) -> None:
    with memory(gm.TagMode.SOFTWARE) as target:
        if path.name.startswith("ok-"):
            migration.restore(io.BytesIO(path.read_bytes()), target)
        else:
            with pytest.raises(gm.StreamError):
                migration.restore(io.BytesIO(path.read_bytes()), target)
