"""Contract: attach() checks the shared table against its fds and refuses a
table they cannot back with a typed error, never SIGBUS on first access."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

import guestmem as gm
from conftest import BASE, run_child

SIZE = 0x10000
SHARED_MODES = [gm.TagMode.SOFTWARE, gm.TagMode.NONE]  # HARDWARE memfd tags need a real kernel


@pytest.fixture(params=SHARED_MODES, ids=lambda m: m.name)
def sharer(request: pytest.FixtureRequest) -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.memfd(SIZE, gpa=BASE, tags=request.param) as memory:
        yield memory


def test_a_region_larger_than_its_memfd_is_refused(sharer: gm.GuestMemory) -> None:
    (shared,) = sharer.share()
    bigger = dataclasses.replace(shared, size=2 * SIZE)
    with pytest.raises(gm.SharedTableError, match="memfd holds"):
        gm.GuestMemory.attach([bigger], tags=sharer.tag_mode)


def test_a_smaller_region_is_fine(sharer: gm.GuestMemory) -> None:
    (shared,) = sharer.share()
    if sharer.tag_mode is gm.TagMode.SOFTWARE:
        pytest.skip("SOFTWARE: a smaller region needs a smaller tag table (refused below)")
    with gm.GuestMemory.attach([dataclasses.replace(shared, size=SIZE // 2)], tags="none") as m:
        sharer.write(BASE, b"seen")
        assert m.read(BASE, 4) == b"seen"


def test_a_tag_table_of_the_wrong_size_is_refused() -> None:
    with gm.GuestMemory.memfd(SIZE, gpa=BASE, tags="software") as memory:
        (shared,) = memory.share()
        assert shared.table_fd is not None
        for wrong in (SIZE // 16 - 1, SIZE // 16 + 1, 0):
            os.ftruncate(shared.table_fd, wrong)
            with pytest.raises(gm.SharedTableError, match="tag table"):
                gm.GuestMemory.attach([shared], tags="software")
        os.ftruncate(shared.table_fd, SIZE // 16)
        with pytest.raises(gm.SharedTableError, match="no SOFTWARE tag table"):
            gm.GuestMemory.attach([dataclasses.replace(shared, table_fd=None)], tags="software")


def test_bad_fds_are_typed_errors() -> None:
    with gm.GuestMemory.memfd(SIZE, gpa=BASE, tags="software") as memory:
        (shared,) = memory.share()
        closed = os.dup(shared.fd)
        os.close(closed)
        for bad, error in (
            (dataclasses.replace(shared, fd=closed), gm.NativeOSError),
            (dataclasses.replace(shared, table_fd=closed), gm.NativeOSError),
            (dataclasses.replace(shared, fd="3"), gm.ArgumentTypeError),  # type: ignore[arg-type]
        ):
            with pytest.raises(error):
                gm.GuestMemory.attach([bad], tags="software")


def test_an_oversized_region_never_kills_the_process() -> None:
    """What used to die of SIGBUS on first access: now an exception, in a child to be safe."""
    result = run_child(
        """
        import dataclasses
        import guestmem as gm
        with gm.GuestMemory.memfd(0x10000, tags="none") as memory:
            (shared,) = memory.share()
            try:
                bigger = dataclasses.replace(shared, size=0x40000)
                other = gm.GuestMemory.attach([bigger], tags="none")
                other.read(0x3F000, 16)
            except gm.SharedTableError:
                print("refused")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
