"""Guest memory shared with a device-model process (as with vhost-user):
the same bytes and the same tags on both sides, and DMA keeps them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import guestmem as gm
from conftest import QEMU_USER

pytestmark = pytest.mark.kernel

DEVICE_MODEL = """
import json, sys
import numpy as np
import guestmem as gm
mode, table = sys.argv[1], json.loads(sys.argv[2])
shared = [gm.SharedRegion(**entry) for entry in table]
with gm.GuestMemory.attach(shared, tags=mode) as mem:
    print("tags", mem.get_tags(0x40000000, 64).tolist(), flush=True)
    print("data", mem.read(0x40000000, 5).decode(), flush=True)
    mem.write(0x40000008, b"from the device", route=gm.Route.MATCH_ALL)
    mem.dma.io.write_to(1, 0x40000000, 5)
    if mem.tag_mode is not gm.TagMode.NONE:
        mem.set_tags(0x40001000, 32, [7, 8])
"""


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor)


def test_a_second_process_sees_and_sets_the_same_tags(mode: gm.TagMode) -> None:
    if mode is gm.TagMode.HARDWARE and QEMU_USER:
        pytest.skip(
            "QEMU user emulation keeps no MTE tags on shared mappings: "
            "the arm64-kernel lane runs this in HARDWARE mode"
        )
    if mode is gm.TagMode.KVM and kernel_version() < (6, 2):
        with pytest.raises(gm.UnsupportedError, match=r"before 6\.2"):
            gm.GuestMemory.memfd(0x10000, gpa=0x4000_0000, tags=mode)
        return
    with gm.GuestMemory.memfd(0x10000, gpa=0x4000_0000, tags=mode) as mem:
        if mode is not gm.TagMode.NONE:
            mem.set_tags(0x4000_0000, 64, [3, 1, 4, 1])
        mem.write(0x4000_0000, b"hello")
        table = mem.share()
        fds = [fd for r in table for fd in (r.fd, r.table_fd) if fd is not None]
        entries = [vars(r) for r in table]
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(DEVICE_MODEL), mode.name, json.dumps(entries)],
            capture_output=True,
            text=True,
            pass_fds=fds,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        expected_tags = [3, 1, 4, 1] if mode is not gm.TagMode.NONE else [0, 0, 0, 0]
        assert f"tags {expected_tags}" in result.stdout
        assert "data hello" in result.stdout
        assert result.stdout.endswith("hello")
        assert mem.read(0x4000_0008, 15) == b"from the device"
        if mode is not gm.TagMode.NONE:
            np.testing.assert_array_equal(mem.get_tags(0x4000_0000, 64), expected_tags)
            assert mem.get_tags(0x4000_1000, 32).tolist() == [7, 8]


def test_anonymous_memory_cannot_be_shared() -> None:
    with (
        gm.GuestMemory.anonymous(0x10000, tags="software") as mem,
        pytest.raises(gm.UnsupportedError),
    ):
        mem.share()
