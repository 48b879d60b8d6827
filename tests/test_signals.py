"""Signals inside unchecked(): the handler runs with checks on (TCO clear),
and the scope gets its TCO back. Only a real kernel shows the first part."""

from __future__ import annotations

import pytest

import guestmem.platform as gmp
from conftest import QEMU_USER, needs_mte
from guestmem import unchecked

pytestmark = pytest.mark.kernel


@needs_mte
def test_a_signal_handler_starts_checked_and_tco_comes_back() -> None:
    with unchecked():
        in_handler, after = gmp.probe_signal_tco()
        assert gmp.thread_tco()
    assert after is True  # the interrupted scope still holds TCO
    if QEMU_USER:
        # QEMU user mode hands the handler the interrupted TCO (PLATFORM.md):
        # this lane can only record it; the kernel lane asserts the real rule.
        assert in_handler is True
    else:
        assert in_handler is False
    assert not gmp.thread_tco()
