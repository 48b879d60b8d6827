"""Contract: a caller's buffer that overlaps the guest range gives memmove
results on every route and tag mode; a buffer that is itself tagged guest
memory is read and written without tag checks (under TCO) and never faults."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import BASE, MODES, REGION, needs_mte, snapshot

TAG = 5  # every granule of the first region under CHECKED, which needs one tag
OTHER_TAG = 9  # the second region
BOUNCE_SIZE = 256  # small staging buffers: BOUNCE copies in many chunks

ROUTES = list(gm.Route)
overlaps = st.tuples(st.integers(0, 2048), st.integers(0, 2048), st.integers(1, 2048))


@pytest.fixture(params=MODES, ids=lambda m: m.name)
def mem(request: pytest.FixtureRequest) -> Iterator[gm.GuestMemory]:
    """Two adjacent regions; BOUNCE staging buffers of BOUNCE_SIZE bytes."""
    regions = [gm.GuestRegion.anonymous(BASE + i * REGION, REGION, request.param) for i in (0, 1)]
    with gm.GuestMemory(regions, bounce_buffer_size=BOUNCE_SIZE) as memory:
        yield memory


def prepare(memory: gm.GuestMemory, route: gm.Route = gm.Route.CHECKED) -> np.ndarray:
    """Tags on both regions, random bytes in the first; return its bytes.

    The first region gets runs of random tags (MATCH_ALL copies run by run),
    or TAG everywhere for CHECKED.
    """
    rng = np.random.default_rng(7)
    if memory.tag_mode is not gm.TagMode.NONE:
        granules = REGION // gm.GRANULE
        runs = np.repeat(rng.integers(0, 16, granules), rng.integers(1, 6, granules))
        tags = np.full(granules, TAG) if route is gm.Route.CHECKED else runs[:granules]
        memory.set_tags(BASE, REGION, tags.astype(np.uint8))
        memory.set_tags(BASE + REGION, REGION, OTHER_TAG)
    data = rng.integers(0, 256, REGION, dtype=np.uint8)
    memory.write(BASE, data, route=gm.Route.TCO)
    return data


def route_args(memory: gm.GuestMemory, route: gm.Route) -> dict[str, object]:
    if route is gm.Route.CHECKED:
        if memory.tag_mode is gm.TagMode.NONE:
            pytest.skip("TagMode.NONE has no tags: CHECKED is refused there")
        return {"route": route, "tag": TAG}
    return {"route": route}


def first_region(memory: gm.GuestMemory) -> np.ndarray:
    return np.frombuffer(memory.read(BASE, REGION, route=gm.Route.TCO), dtype=np.uint8)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
@given(where=overlaps)
def test_write_from_an_overlapping_view_is_a_memmove(
    mem: gm.GuestMemory, route: gm.Route, where: tuple[int, int, int]
) -> None:
    src, dst, n = where
    before = prepare(mem, route)
    kwargs = route_args(mem, route)
    mem.write(BASE + dst, mem.view(BASE + src, n), **kwargs)  # type: ignore[arg-type]
    expected = before.copy()
    expected[dst : dst + n] = before[src : src + n]
    np.testing.assert_array_equal(first_region(mem), expected)
    assert not gm.thread_tco()


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
@given(where=overlaps)
def test_readinto_an_overlapping_view_is_a_memmove(
    mem: gm.GuestMemory, route: gm.Route, where: tuple[int, int, int]
) -> None:
    src, dst, n = where
    before = prepare(mem, route)
    kwargs = route_args(mem, route)
    assert mem.readinto(BASE + src, mem.view(BASE + dst, n), **kwargs) == n  # type: ignore[arg-type]
    expected = before.copy()
    expected[dst : dst + n] = before[src : src + n]
    np.testing.assert_array_equal(first_region(mem), expected)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_writev_and_readv_into_with_overlap(mem: gm.GuestMemory, route: gm.Route) -> None:
    before = prepare(mem, route)
    kwargs = route_args(mem, route)
    ranges = [(BASE + 100, 300), (BASE + 1000, 200)]
    mem.writev(ranges, mem.view(BASE + 150, 500), **kwargs)  # type: ignore[arg-type]
    expected = before.copy()
    expected[100:400] = before[150:450]
    expected[1000:1200] = before[450:650]
    np.testing.assert_array_equal(first_region(mem), expected)
    before = expected.copy()
    mem.readv_into(ranges, mem.view(BASE + 250, 500), **kwargs)  # type: ignore[arg-type]
    expected[250:550] = before[100:400]
    expected[550:750] = before[1000:1200]
    np.testing.assert_array_equal(first_region(mem), expected)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_a_buffer_in_another_tagged_region_is_copied_unchecked(
    mem: gm.GuestMemory, route: gm.Route
) -> None:
    """Under HARDWARE the buffer is tagged memory reached through an untagged
    pointer: the core copies it under TCO, whatever the route checks."""
    before = prepare(mem, route)
    kwargs = route_args(mem, route)
    other = BASE + REGION
    mem.write(other, mem.view(BASE, 4096), route=gm.Route.TCO)
    mem.fill(BASE, 4096, 0xEE, route=gm.Route.TCO)
    mem.write(BASE, mem.view(other, 4096), **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(first_region(mem)[:4096], before[:4096])
    mem.readinto(BASE + 8192, mem.view(other + 16, 1024), **kwargs)  # type: ignore[arg-type]
    assert mem.read(other + 16, 1024, route=gm.Route.TCO) == before[8192 : 8192 + 1024].tobytes()
    assert not gm.thread_tco()


@needs_mte
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_hardware_aliasing_keeps_tags_and_thread_state(route: gm.Route) -> None:
    """Guest memory as the caller's buffer, under real tag checks: no fault, tags kept."""
    layout = [(BASE, REGION), (BASE + REGION, REGION)]
    with gm.GuestMemory.from_layout(layout, tags="hardware") as m:
        before = prepare(m, route)
        tags = snapshot(m)[1]
        kwargs = route_args(m, route)
        m.write(BASE + 32, m.view(BASE, 4096), **kwargs)  # type: ignore[arg-type]
        expected = before.copy()
        expected[32 : 32 + 4096] = before[:4096]
        m.readinto(BASE, m.view(BASE + REGION + 48, 512), **kwargs)  # type: ignore[arg-type]
        assert m.read(BASE + REGION + 48, 512, route=gm.Route.TCO) == expected[:512].tobytes()
        assert not gm.thread_tco()
        assert gm.thread_check_mode() is gm.CheckMode.SYNC
        for now, then in zip(snapshot(m)[1], tags, strict=True):
            np.testing.assert_array_equal(now, then)


@needs_mte
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_a_tagged_dma_segment_as_the_buffer(route: gm.Route) -> None:
    """The buffer is guest memory through a pointer carrying its tag (a MATCH_ALL
    segment): overlap is found with the tag bits stripped, and nothing faults."""
    layout = [(BASE, REGION), (BASE + REGION, REGION)]
    with gm.GuestMemory.from_layout(layout, tags="hardware") as m:
        before = prepare(m, route)
        into_first = route_args(m, route)  # CHECKED: TAG, the first region's
        into_second = {**into_first, "tag": OTHER_TAG} if "tag" in into_first else into_first
        second = BASE + REGION  # OTHER_TAG everywhere: one segment
        m.write(second, before[:1024], route=gm.Route.TCO)
        direction = gm.Direction.BIDIRECTIONAL
        with m.dma.map(second, 512, direction, route=gm.Route.MATCH_ALL) as segment:
            m.write(second + 256, segment, **into_second)  # type: ignore[arg-type]
            m.readinto(BASE, segment, **into_first)  # type: ignore[arg-type]
        expected = before[:1024].copy()
        expected[256:768] = before[:512]  # the overlapping write
        expected[:512] = before[:512]  # the read from the first region into the segment
        assert m.read(second, 1024, route=gm.Route.TCO) == expected.tobytes()
        np.testing.assert_array_equal(first_region(m), before)
        assert not gm.thread_tco()
