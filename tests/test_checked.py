"""CHECKED: a wrong logical tag is an exception with the facts, not a crash;
a write that would fail changes nothing."""

from __future__ import annotations

import pytest

import guestmem as gm
from conftest import BASE, REGION, assert_unchanged, snapshot


@pytest.mark.parametrize("op", ["read", "write", "fill"])
def test_wrong_tag_raises_with_the_exact_gpa_and_both_tags(tmem: gm.GuestMemory, op: str) -> None:
    tmem.set_tags(BASE, 4096, 6)
    tmem.set_tags(BASE + 0x230, 16, 9)  # one foreign granule inside the range
    tmem.write(BASE, b"\xaa" * 4096, route=gm.Route.TCO)
    before = snapshot(tmem)

    with pytest.raises(gm.TagCheckError) as caught:
        if op == "read":
            tmem.read(BASE + 0x105, 0x400, route=gm.Route.CHECKED, tag=6)
        elif op == "write":
            tmem.write(BASE + 0x105, b"\x55" * 0x400, route=gm.Route.CHECKED, tag=6)
        else:
            tmem.fill(BASE + 0x105, 0x400, 0x55, route=gm.Route.CHECKED, tag=6)

    assert caught.value.gpa == BASE + 0x230
    assert caught.value.logical_tag == 6
    assert caught.value.allocation_tag == 9
    assert_unchanged(tmem, before)  # nothing written before the bad granule either
    assert gm.thread_tco() is False
    # The process goes on, and the right tag works.
    assert tmem.read(BASE + 0x105, 0x100, route=gm.Route.CHECKED, tag=6) == b"\xaa" * 0x100


def test_mismatch_in_the_first_byte_reports_that_byte(tmem: gm.GuestMemory) -> None:
    tmem.set_tags(BASE + 0x40, 16, 3)
    with pytest.raises(gm.TagCheckError) as caught:
        tmem.read(BASE + 0x47, 4, route=gm.Route.CHECKED, tag=4)
    assert (caught.value.gpa, caught.value.logical_tag, caught.value.allocation_tag) == (
        BASE + 0x47,
        4,
        3,
    )


def test_checked_write_across_regions_is_all_or_nothing(tmem: gm.GuestMemory) -> None:
    boundary = BASE + REGION
    tmem.set_tags(boundary - 256, 512, 2)
    tmem.set_tags(boundary + 128, 16, 12)
    before = snapshot(tmem)
    with pytest.raises(gm.TagCheckError) as caught:
        tmem.write(boundary - 256, bytes(512), route=gm.Route.CHECKED, tag=2)
    assert caught.value.gpa == boundary + 128
    assert caught.value.allocation_tag == 12
    assert_unchanged(tmem, before)


def test_checked_inside_unchecked_scopes_still_checks(tmem: gm.GuestMemory) -> None:
    """CHECKED is asked for explicitly: TCO or checks-off for the thread must not mute it."""
    tmem.set_tags(BASE, 64, 1)
    with gm.unchecked(), pytest.raises(gm.TagCheckError):
        tmem.read(BASE, 64, route=gm.Route.CHECKED, tag=2)
    assert gm.thread_tco() is False
    with gm.unchecked_thread():
        with pytest.raises(gm.TagCheckError):
            tmem.read(BASE, 64, route=gm.Route.CHECKED, tag=2)
        assert gm.thread_check_mode() is gm.CheckMode.NONE
    assert tmem.read(BASE, 64, route=gm.Route.CHECKED, tag=1) == bytes(64)


def test_checked_without_tag_storage_is_unsupported() -> None:
    with (
        gm.GuestMemory.anonymous(0x10000, tags="none") as memory,
        pytest.raises(gm.UnsupportedError),
    ):
        memory.read(0, 16, route=gm.Route.CHECKED, tag=0)
