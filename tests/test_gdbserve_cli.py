"""``guestmem gdbserve``'s flags: loopback unless --allow-remote (with a
warning), --read-only, --idle-timeout; every operator error is one line and
exit status 1 (2 for a flag argparse refuses), never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import LANE
from guestmem.gdbstub.packets import frame
from test_gdbstub_server import Client

pytestmark = pytest.mark.skipif(
    LANE != "host", reason="the CLI runs in host Python: the host lane runs it"
)
BASE = 0x4000_0000
GDBSERVE = [sys.executable, "-m", "guestmem", "gdbserve", "--tags", "software"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GDBSERVE, *args], capture_output=True, text=True, timeout=60)


@contextmanager
def gdbserve(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A running ``gdbserve --once``: the address to connect to, and the process."""
    server = subprocess.Popen(
        [*GDBSERVE, "--port", "0", "--once", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    banner = server.stdout.readline()
    assert "listening on" in banner, banner
    port = banner.split()[4].rsplit(":", 1)[1]
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        server.kill()
        server.wait(timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_non_loopback_host_needs_allow_remote() -> None:
    result = run("--host", "0.0.0.0", "--port", "0")
    assert_one_line_error(result, "--allow-remote", "no authentication")
    assert result.stdout == ""  # never listened


def test_allow_remote_warns_that_anyone_can_write_memory() -> None:
    with gdbserve("--host", "0.0.0.0", "--allow-remote") as (address, server):
        c = Client(address)
        assert c.ask(b"m%x,1" % BASE) != b"E0d"
        c.raw(frame(b"D"))
        c.close()
        assert server.wait(timeout=60) == 0
        assert server.stderr is not None
        warning = server.stderr.read()
    assert "no authentication" in warning and "read and write" in warning, warning


def test_read_only_refuses_writes() -> None:
    with gdbserve("--read-only") as (address, server):
        c = Client(address)
        before = c.ask(b"m%x,4" % BASE)
        assert c.ask(b"M%x,4:00000000" % BASE) == b"E0d"
        assert c.ask(b"X%x,1:a" % BASE) == b"E0d"
        assert c.ask(b"QMemTags:%x,10:1:05" % BASE) == b"E0d"
        assert c.ask(b"m%x,4" % BASE) == before
        c.raw(frame(b"D"))
        c.close()
        assert server.wait(timeout=60) == 0


def test_idle_timeout_ends_a_silent_session() -> None:
    with gdbserve("--idle-timeout", "0.5") as (address, server):
        c = Client(address)
        assert c.ask(b"qAttached") == b"1"
        assert c.sock.recv(10) == b""
        c.close()
        assert server.wait(timeout=60) == 0  # --once: the session is over


def test_an_unreadable_stream_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("--restore", str(tmp_path / "missing.gms")), "missing.gms")
    assert_one_line_error(run("--restore", str(tmp_path)), "cannot serve")


def test_a_port_in_use_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert_one_line_error(run("--port", str(port)), "cannot listen", str(port))


@pytest.mark.parametrize(
    "flags",
    [["--tags", "bogus"], ["--size-mib", "0"], ["--idle-timeout", "-1"], ["--port", "x"]],
    ids=lambda f: f[0],
)
def test_bad_flags_get_a_usage_error(flags: list[str]) -> None:
    result = run(*flags)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and "usage:" in result.stderr, result.stderr
