"""Every route x access class x tag mode moves exactly the bytes asked for and
leaves every tag (and every other byte) as it was."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import BASE, REGION, snapshot

pytestmark = pytest.mark.kernel  # the kernel lane runs these in KVM mode

SPAN = 2 * REGION  # the two adjacent regions
MOVING_ROUTES = [r for r in gm.Route if r is not gm.Route.CHECKED]


def random_tag_layout(memory: gm.GuestMemory, seed: int) -> None:
    """Runs of random tags and random lengths over all of guest memory."""
    rng = np.random.default_rng(seed)
    for region in memory.regions:
        granules = region.size // gm.GRANULE
        runs = rng.integers(1, 40, size=granules)
        tags = np.repeat(rng.integers(0, 16, size=granules), runs)[:granules]
        memory.set_tags(region.gpa, region.size, tags.astype(np.uint8))


ranges = st.tuples(st.integers(0, SPAN - 1), st.integers(0, 3000)).map(
    lambda t: (BASE + t[0], min(t[1], SPAN - t[0]))
)


@pytest.mark.parametrize("access", list(gm.Access), ids=lambda a: a.name)
@pytest.mark.parametrize("route", MOVING_ROUTES, ids=lambda r: r.name)
@given(where=ranges, seed=st.integers(0, 2**32 - 1))
def test_write_then_read_back(
    mem: gm.GuestMemory, route: gm.Route, access: gm.Access, where: tuple[int, int], seed: int
) -> None:
    memory = mem
    if memory.tag_mode is not gm.TagMode.NONE:
        random_tag_layout(memory, seed)
    gpa, length = where
    data = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    before_data, before_tags = snapshot(memory)

    memory.write(gpa, data, access=access, route=route)
    assert memory.read(gpa, length, access=access, route=route) == data

    after_data, after_tags = snapshot(memory)
    whole = bytearray(before_data[0] + before_data[1])
    whole[gpa - BASE : gpa - BASE + length] = data
    assert after_data[0] + after_data[1] == bytes(whole)
    assert after_data[2] == before_data[2]
    for now, then in zip(after_tags, before_tags, strict=True):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize("access", list(gm.Access), ids=lambda a: a.name)
@given(where=ranges, seed=st.integers(0, 2**32 - 1), tag=st.integers(0, 15))
def test_checked_with_the_right_tag(
    tmem: gm.GuestMemory, access: gm.Access, where: tuple[int, int], seed: int, tag: int
) -> None:
    random_tag_layout(tmem, seed)
    gpa, length = where
    first = gpa - gpa % gm.GRANULE
    last = -(-(gpa + length) // gm.GRANULE) * gm.GRANULE
    if last > first:
        tmem.set_tags(first, last - first, tag)
    data = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    _, before_tags = snapshot(tmem)

    tmem.write(gpa, data, access=access, route=gm.Route.CHECKED, tag=tag)
    assert tmem.read(gpa, length, access=access, route=gm.Route.CHECKED, tag=tag) == data
    assert tmem.read(gpa, length, route=gm.Route.TCO) == data

    for now, then in zip(snapshot(tmem)[1], before_tags, strict=True):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize("route", MOVING_ROUTES, ids=lambda r: r.name)
@given(where=ranges, seed=st.integers(0, 2**32 - 1), byte=st.integers(0, 255))
def test_fill(
    mem: gm.GuestMemory, route: gm.Route, where: tuple[int, int], seed: int, byte: int
) -> None:
    memory = mem
    if memory.tag_mode is not gm.TagMode.NONE:
        random_tag_layout(memory, seed)
    gpa, length = where
    _, before_tags = snapshot(memory)
    memory.fill(gpa, length, byte, route=route)
    assert memory.read(gpa, length) == bytes([byte]) * length
    for now, then in zip(snapshot(memory)[1], before_tags, strict=True):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize("route", MOVING_ROUTES, ids=lambda r: r.name)
@given(
    chunks=st.lists(
        st.tuples(st.integers(0, SPAN - 1), st.integers(0, 600)), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_scatter_gather(
    mem: gm.GuestMemory, route: gm.Route, chunks: list[tuple[int, int]], seed: int
) -> None:
    memory = mem
    if memory.tag_mode is not gm.TagMode.NONE:
        random_tag_layout(memory, seed)
    # Non-overlapping descriptors, as a virtio chain has.
    chosen: list[tuple[int, int]] = []
    for offset, length in sorted(chunks):
        start = max(offset, chosen[-1][0] - BASE + chosen[-1][1] if chosen else 0)
        length = min(length, SPAN - start)
        if length > 0:
            chosen.append((BASE + start, length))
    total = sum(n for _, n in chosen)
    data = np.random.default_rng(seed).integers(0, 256, size=total, dtype=np.uint8).tobytes()

    memory.writev(chosen, data, route=route)
    assert memory.readv(chosen, route=route) == data
    at = 0
    for gpa, length in chosen:
        assert memory.read(gpa, length) == data[at : at + length]
        at += length


def test_policy_routes_each_access_class(mem: gm.GuestMemory) -> None:
    policy = gm.Policy()
    assert policy.route_for(gm.Access.DMA) is gm.Route.TCO
    assert policy.route_for(gm.Access.DEBUG) is gm.Route.TCO
    assert policy.route_for(gm.Access.MIGRATION) is gm.Route.MATCH_ALL
    custom = gm.Policy(dma=gm.Route.BOUNCE, debug=gm.Route.UNCHECKED_THREAD)
    assert custom.route_for(gm.Access.DMA) is gm.Route.BOUNCE
    assert custom.route_for(gm.Access.DEBUG) is gm.Route.UNCHECKED_THREAD
    with pytest.raises(ValueError, match="CHECKED"):
        gm.Policy(dma=gm.Route.CHECKED)


def test_default_policy_reaches_tagged_memory(mem: gm.GuestMemory) -> None:
    """With no route named, each class's default route crosses mixed tags."""
    if mem.tag_mode is not gm.TagMode.NONE:
        random_tag_layout(mem, 7)
    for access in gm.Access:
        data = bytes([access.value.__len__()]) * 5000
        mem.write(BASE + 8, data, access=access)
        assert mem.read(BASE + 8, len(data), access=access) == data
