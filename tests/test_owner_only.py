"""Sockets and files only their owner can reach (guestmem.owner_only).

Modes are checked under several umasks in child processes (the umask is
process-wide); what is already at a path is refused or replaced as the
docstrings say, and is shown untouched when refused. Host lane.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

import guestmem as gm
from guestmem import owner_only


@pytest.fixture
def here() -> Iterator[Path]:
    """A short directory (a unix socket path holds at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="oo", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022, 0o077, 0o277])
def test_socket_and_file_are_0600_under_any_umask(here: Path, umask: int) -> None:
    result = run_python(
        f"""
        import json, os, stat
        from guestmem import owner_only
        os.umask({umask:#o})
        sock = owner_only.bind_unix({str(here / "ctl")!r})
        owner_only.write_file({str(here / "snap")!r}, lambda f: f.write(b"ram"))
        modes = {{n: stat.S_IMODE(os.lstat(os.path.join({str(here)!r}, n)).st_mode)
                  for n in os.listdir({str(here)!r})}}
        print(json.dumps(modes))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ctl": 0o600, "snap": 0o600}
    assert stat.S_ISSOCK(os.lstat(here / "ctl").st_mode)
    assert (here / "snap").read_bytes() == b"ram"


def connect_and_greet(path: Path, server: socket.socket) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(str(path))
        client.sendall(b"hello")
        server.settimeout(5)
        accepted, _ = server.accept()
        with accepted:
            return accepted.recv(5)


def test_a_bound_socket_serves_at_its_path(here: Path) -> None:
    with owner_only.bind_unix(str(here / "ctl")) as server:
        assert connect_and_greet(here / "ctl", server) == b"hello"
    assert sorted(os.listdir(here)) == ["ctl"]


def test_a_live_socket_is_refused_and_still_serves(here: Path) -> None:
    path = here / "ctl"
    with owner_only.bind_unix(str(path)) as server:
        inode = os.lstat(path).st_ino
        with pytest.raises(gm.UsageError, match="another process is serving this socket") as err:
            owner_only.bind_unix(str(path))
        assert str(path) in str(err.value)
        assert os.lstat(path).st_ino == inode
        # The refused call's probe is in the backlog; then a real client.
        server.settimeout(5)
        server.accept()[0].close()
        assert connect_and_greet(path, server) == b"hello"
    assert sorted(os.listdir(here)) == ["ctl"]


def test_a_socket_served_by_another_process_is_refused(here: Path) -> None:
    path = here / "ctl"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.bind({str(path)!r}); s.listen(4)\n"
            "print('ready', flush=True); sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        with pytest.raises(gm.UsageError, match="another process is serving"):
            owner_only.bind_unix(str(path))
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the child's
    finally:
        child.communicate("", timeout=30)
    assert sorted(os.listdir(here)) == ["ctl"]


def test_a_stale_socket_is_replaced(here: Path) -> None:
    path = here / "ctl"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))
    os.chmod(path, 0o777)
    stale = os.lstat(path).st_ino
    with owner_only.bind_unix(str(path)) as server:
        assert os.lstat(path).st_ino != stale
        assert mode_of(path) == 0o600
        assert connect_and_greet(path, server) == b"hello"
    assert sorted(os.listdir(here)) == ["ctl"]


def plant_file(path: Path) -> Callable[[], object]:
    path.write_bytes(b"precious")
    os.chmod(path, 0o644)
    return lambda: (path.read_bytes(), mode_of(path), stat.S_ISREG(os.lstat(path).st_mode))


def plant_fifo(path: Path) -> Callable[[], object]:
    os.mkfifo(path, 0o644)
    return lambda: (stat.S_ISFIFO(os.lstat(path).st_mode), mode_of(path))


def plant_directory(path: Path) -> Callable[[], object]:
    path.mkdir()
    (path / "inside").write_bytes(b"kept")
    return lambda: (path.is_dir(), (path / "inside").read_bytes())


def plant_symlink(path: Path) -> Callable[[], object]:
    target = path.parent / "target"
    target.write_bytes(b"precious")
    os.chmod(target, 0o644)
    path.symlink_to(target)
    return lambda: (os.readlink(path), target.read_bytes(), mode_of(target))


def plant_symlink_to_stale_socket(path: Path) -> Callable[[], object]:
    target = path.parent / "target"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(target))
    path.symlink_to(target)
    return lambda: (os.readlink(path), os.lstat(target).st_ino)


PLANTED = {
    "file": plant_file,
    "fifo": plant_fifo,
    "directory": plant_directory,
    "symlink": plant_symlink,
    "symlink-to-stale-socket": plant_symlink_to_stale_socket,
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_bind_refuses_what_is_not_a_socket_and_leaves_it(here: Path, kind: str) -> None:
    path = here / "ctl"
    look = PLANTED[kind](path)
    before = look()
    listing = sorted(os.listdir(here))
    with pytest.raises(gm.UsageError, match="is not a socket") as err:
        owner_only.bind_unix(str(path))
    assert str(err.value).startswith(f"{path}:")
    assert look() == before
    assert sorted(os.listdir(here)) == listing


def test_bind_refuses_a_path_too_long_and_leaves_no_directory(here: Path) -> None:
    path = here / ("s" * (108 - len(str(here)) - 1))
    assert len(str(path)) == 108
    with pytest.raises(gm.UsageError, match="too long for a unix socket") as err:
        owner_only.bind_unix(str(path))
    assert str(err.value).startswith(f"{path}:")
    assert os.listdir(here) == []


def test_bind_refuses_a_path_whose_temporary_name_is_too_long(here: Path) -> None:
    deep = here / ("d" * (104 - len(str(here)) - 1))
    deep.mkdir()
    path = deep / "c"  # 106 bytes: fits, but deep/.XXXXXXXX/s would not
    with pytest.raises(gm.UsageError, match=r"its temporary name .* exceeds 107 bytes"):
        owner_only.bind_unix(str(path))
    assert os.listdir(deep) == []


def test_bind_in_a_missing_directory_names_the_path(here: Path) -> None:
    path = here / "nowhere" / "ctl"
    with pytest.raises(gm.NativeOSError, match="No such file") as err:
        owner_only.bind_unix(str(path))
    assert err.value.strerror == f"{path}: No such file or directory"


def test_bind_leaves_no_directory_when_installing_fails(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(gm.NativeOSError, match="Permission denied") as err:
        owner_only.bind_unix(str(here / "ctl"))
    assert str(here / "ctl") in str(err.value)
    monkeypatch.undo()
    assert os.listdir(here) == []


def test_bind_leaves_no_directory_on_keyboard_interrupt(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(path: str, mode: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "chmod", interrupt)
    with pytest.raises(KeyboardInterrupt):
        owner_only.bind_unix(str(here / "ctl"))
    monkeypatch.undo()
    assert os.listdir(here) == []


def test_bind_gives_up_on_a_directory_someone_keeps_locked(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owner_only, "DIRECTORY_LOCK_TIMEOUT", 0.2)
    holder = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(gm.UsageError, match=f"holds a lock on {here}"):
            owner_only.bind_unix(str(here / "ctl"))
        assert os.listdir(here) == []
        fcntl.flock(holder, fcntl.LOCK_UN)
        owner_only.bind_unix(str(here / "ctl")).close()
    finally:
        os.close(holder)


@pytest.mark.parametrize("before", ["nothing", "stale socket"])
def test_32_concurrent_binds_on_one_path_one_wins(here: Path, before: str) -> None:
    path = here / "ctl"
    if before == "stale socket":
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(str(path))
    start = threading.Barrier(32)
    won: list[socket.socket] = []
    refused: list[BaseException] = []

    def bind() -> None:
        start.wait()
        try:
            won.append(owner_only.bind_unix(str(path)))
        except BaseException as err:
            refused.append(err)

    threads = [threading.Thread(target=bind) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert len(won) == 1
        assert len(refused) == 31
        assert all(isinstance(e, gm.UsageError) for e in refused), refused
        assert all(f"{path}: another process is serving" in str(e) for e in refused)
        assert sorted(os.listdir(here)) == ["ctl"]
        while True:  # drain the refused calls' probes from the backlog
            won[0].setblocking(False)
            try:
                won[0].accept()[0].close()
            except BlockingIOError:
                break
        assert connect_and_greet(path, won[0]) == b"hello"
    finally:
        for sock in won:
            sock.close()


def test_write_file_returns_what_fill_returns_and_replaces_the_old_file(here: Path) -> None:
    path = here / "snap"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)

    def fill(file: BinaryIO) -> int:
        return file.write(b"new state")

    assert owner_only.write_file(str(path), fill) == 9
    assert path.read_bytes() == b"new state"
    assert mode_of(path) == 0o600
    assert sorted(os.listdir(here)) == ["snap"]


def test_write_file_replaces_a_symlink_without_touching_its_target(here: Path) -> None:
    path = here / "snap"
    plant_symlink(path)
    owner_only.write_file(str(path), lambda f: f.write(b"ram"))
    assert not path.is_symlink()
    assert path.read_bytes() == b"ram"
    assert mode_of(path) == 0o600
    assert (here / "target").read_bytes() == b"precious"
    assert mode_of(here / "target") == 0o644
    assert sorted(os.listdir(here)) == ["snap", "target"]


def test_write_file_replaces_a_fifo_without_blocking_on_it(here: Path) -> None:
    path = here / "snap"
    os.mkfifo(path)
    # Opening a FIFO with no reader would block for ever: a child with a bound.
    result = run_python(
        f"""
        from guestmem import owner_only
        owner_only.write_file({str(path)!r}, lambda f: f.write(b"ram"))
        """,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert path.read_bytes() == b"ram"
    assert sorted(os.listdir(here)) == ["snap"]


def test_write_file_refuses_a_directory_before_writing(here: Path) -> None:
    path = here / "snap"
    look = plant_directory(path)
    called: list[bool] = []
    with pytest.raises(gm.UsageError, match="is a directory") as err:
        owner_only.write_file(str(path), lambda f: called.append(True))
    assert str(err.value).startswith(f"{path}:")
    assert called == []
    assert look() == (True, b"kept")
    assert sorted(os.listdir(here)) == ["snap"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failing_fill_leaves_the_old_file_and_no_temporary(
    here: Path, error: type[BaseException]
) -> None:
    path = here / "snap"
    path.write_bytes(b"old snapshot")

    def fill(file: BinaryIO) -> None:
        file.write(b"half a new one")
        file.flush()
        raise error

    with pytest.raises(error):
        owner_only.write_file(str(path), fill)
    assert path.read_bytes() == b"old snapshot"
    assert sorted(os.listdir(here)) == ["snap"]


def test_a_failing_rename_leaves_no_temporary(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(gm.NativeOSError, match="No space left") as err:
        owner_only.write_file(str(here / "snap"), lambda f: f.write(b"ram"))
    assert str(here / "snap") in str(err.value)
    monkeypatch.undo()
    assert os.listdir(here) == []


def test_write_file_in_a_missing_directory_names_its_path(here: Path) -> None:
    path = here / "nowhere" / "snap"
    with pytest.raises(gm.NativeOSError) as err:
        owner_only.write_file(str(path), lambda f: f.write(b"ram"))
    assert err.value.strerror == f"{path}: No such file or directory"


def test_write_file_with_a_name_of_255_bytes(here: Path) -> None:
    path = here / ("n" * 255)
    owner_only.write_file(str(path), lambda f: f.write(b"ram"))
    assert path.read_bytes() == b"ram"
    assert os.listdir(here) == [path.name]
