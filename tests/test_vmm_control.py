"""The VMM's control socket: what a request may be, and the answer to anything else."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

import guestmem as gm
from guestmem.vmm import control


def _read(data: bytes) -> dict[str, object]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        return control._read_request(ours)


def test_a_request_is_one_json_object_on_one_line() -> None:
    assert _read(b'{"command": "snapshot", "to": "/x"}\n') == {"command": "snapshot", "to": "/x"}


@pytest.mark.parametrize(
    "data",
    [
        b'{"command": "snapshot", "to": "/x"}',  # no newline: the client hung up mid-request
        b"not json\n",
        b"[1, 2]\n",
        b"\xff\xfe\n",
        b"{" + b" " * control.MAX_REQUEST + b"}\n",
    ],
    ids=["unterminated", "not-json", "not-object", "not-utf8", "too-long"],
)
def test_a_malformed_request_is_a_usage_error(data: bytes) -> None:
    with pytest.raises(gm.UsageError):
        _read(data)


@pytest.mark.parametrize(
    "request_",
    [
        {"command": "reboot", "to": "x"},
        {"command": "snapshot"},
        {"command": "snapshot", "to": ""},
        {"command": "snapshot", "to": 5},
        {"command": "snapshot", "to": "/x", "max_rounds": 3},
        {"command": "migrate", "to": "unix:/x", "max_rounds": -1},
        {"command": "migrate", "to": "unix:/x", "max_rounds": True},
        {"command": "migrate", "to": "unix:/x", "max_rounds": control.MAX_ROUNDS_LIMIT + 1},
        {"command": "migrate", "to": "nowhere"},
        {"command": "migrate", "to": "unix:/x", "extra": 1},
    ],
)
def test_a_request_the_vmm_does_not_know_is_refused(request_: dict[str, object]) -> None:
    with pytest.raises(gm.UsageError):
        control._command(request_)


def test_known_requests_are_accepted() -> None:
    assert callable(control._command({"command": "snapshot", "to": "/x"}))
    assert callable(control._command({"command": "migrate", "to": "unix:/x", "max_rounds": 2}))
    assert callable(control._command({"command": "migrate", "to": "tcp:127.0.0.1:4444"}))


class _NoMachine:
    """Stands where a machine would: a refused request must never reach it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"a refused request touched the machine ({name})")


def test_the_server_answers_a_bad_request_and_serves_the_next(tmp_path: Path) -> None:
    path = str(tmp_path / "control")
    server = control.ControlServer(_NoMachine(), path)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        for line in (b"garbage\n", b'{"command": "reboot", "to": "x"}\n'):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
                client.sendall(line)
                answer = json.loads(client.makefile("rb").readline())
            assert answer["ok"] is False and answer["error"], answer
    finally:
        server.close()
        thread.join(timeout=10)
    assert not (tmp_path / "control").exists()


def test_the_server_will_not_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("keep me")
    with pytest.raises(gm.UsageError):
        control.ControlServer(_NoMachine(), str(path))  # type: ignore[arg-type]
    assert path.read_text() == "keep me"
