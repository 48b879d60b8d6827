"""The VMM's control socket, tried as a hostile local user and a careless operator would.

Every request gets exactly one answer, whatever it is or however it
arrives; nothing a client does stops the server serving the next one; a
refused request never reaches the machine. Host lane: the machine is a
stand-in that records what reached it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import guestmem as gm
from guestmem.vmm import control


class FakeMachine:
    """Records the calls a request made; any other use of the machine is a fault."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop(self, reason: str = "quit", detail: str = "") -> None:
        self.calls.append(f"stop:{reason}")

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the stand-in machine has no {name}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[control.ControlServer, FakeMachine, str]]:
    machine = FakeMachine()
    path = str(tmp_path / "control")
    server = control.ControlServer(machine, path)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server, machine, path
    finally:
        server.close()
        thread.join(timeout=10)


def ask(path: str, data: bytes, *, timeout: float = 20.0) -> dict[str, Any]:
    """Send raw bytes as a request; the final answer (progress lines skipped)."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(timeout)
        client.connect(path)
        client.sendall(data)
        for line in client.makefile("rb"):
            answer: dict[str, Any] = json.loads(line)
            if "progress" not in answer:
                return answer
    raise AssertionError("the server hung up without an answer")


def request(path: str, **fields: Any) -> dict[str, Any]:
    return ask(path, json.dumps(fields).encode() + b"\n")


def test_a_request_is_one_json_object_on_one_line() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b'{"command": "status"}\n')
        assert control.read_request(ours) == {"command": "status"}


@pytest.mark.parametrize(
    "data",
    [
        b'{"command": "status"}',  # no newline: the client hung up mid-request
        b"not json\n",
        b"[1, 2]\n",
        b"\xff\xfe\n",
        b"{" + b" " * control.MAX_REQUEST + b"}\n",
        b"[" * 3000 + b"\n",  # json.loads recurses: RecursionError, not an answer, once
        b'{"command": "status", "x": ' + b"[" * 100_000 + b"\n",
    ],
    ids=["unterminated", "not-json", "not-object", "not-utf8", "too-long", "nested", "huge"],
)
def test_a_malformed_request_is_refused_and_the_server_serves_on(
    served: tuple[control.ControlServer, FakeMachine, str], data: bytes
) -> None:
    _, machine, path = served
    try:
        answer = ask(path, data)
    except (BrokenPipeError, ConnectionResetError):  # too long: refused before all was sent
        answer = {"ok": False, "kind": "refused"}
    assert answer["ok"] is False and answer["kind"] == "refused", answer
    assert request(path, command="status")["report"] == {"state": "running"}
    assert machine.calls == []


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"command": "reboot"}, "'reboot'"),
        ({"command": 5}, "5"),
        ({}, "None"),
        ({"command": "snapshot"}, "needs 'to'"),
        ({"command": "snapshot", "to": ""}, "non-empty"),
        ({"command": "snapshot", "to": 5}, "non-empty"),
        ({"command": "snapshot", "to": "relative/file"}, "absolute"),
        ({"command": "snapshot", "to": "/x", "max_rounds": 3}, "'max_rounds'"),
        ({"command": "migrate", "to": "unix:/x", "max_rounds": -1}, "max_rounds"),
        ({"command": "migrate", "to": "unix:/x", "max_rounds": True}, "max_rounds"),
        ({"command": "migrate", "to": "unix:/x", "max_rounds": 65}, "max_rounds"),
        ({"command": "migrate", "to": "unix:/x", "max_downtime_ms": 0}, "max_downtime_ms"),
        ({"command": "migrate", "to": "unix:/x", "timeout": "10"}, "timeout"),
        ({"command": "migrate", "to": "unix:/x", "timeout": 1e9}, "timeout"),
        ({"command": "migrate", "to": "unix:/x", "allow_insecure": 1}, "allow_insecure"),
        ({"command": "migrate", "to": "unix:/x", "tls": {"cert": "/c"}}, "tls"),
        ({"command": "migrate", "to": "unix:/x", "extra": 1}, "'extra'"),
        ({"command": "migrate", "to": "unix:relative"}, "absolute"),
        ({"command": "migrate", "to": "nowhere"}, "nowhere"),
        ({"command": "quit", "to": "/x"}, "'to'"),
        ({"command": "cancel"}, "nothing to cancel"),
        ({"command": "resume"}, "nothing to resume"),
    ],
)
def test_a_request_the_vmm_does_not_take_is_refused_by_name(
    served: tuple[control.ControlServer, FakeMachine, str], fields: dict[str, Any], says: str
) -> None:
    _, machine, path = served
    answer = request(path, **fields)
    assert answer["ok"] is False and answer["kind"] == "refused", answer
    assert says in answer["error"], answer
    assert machine.calls == []


def test_migrate_options_are_read_whole() -> None:
    where, options, files, insecure = control.migrate_options(
        {"command": "migrate", "to": "tcp:10.0.0.2:4444", "max_downtime_ms": 500, "timeout": 2}
    )
    assert str(where) == "tcp:10.0.0.2:4444" and files is None and insecure is False
    assert (options.max_rounds, options.max_downtime, options.timeout) == (8, 0.5, 2)
    tls = {"cert": "/nonexistent/c.pem", "key": "/nonexistent/k.pem", "ca": "/nonexistent/ca.pem"}
    with pytest.raises(control.Refused, match=r"/nonexistent/c\.pem"):
        control.migrate_options({"command": "migrate", "to": "tcp:h:1", "tls": tls})
    with pytest.raises(control.Refused, match="absolute"):
        control.migrate_options({"command": "migrate", "to": "tcp:h:1", "tls": {**tls, "ca": "x"}})


def test_a_fault_inside_a_request_is_answered_and_the_server_serves_on(
    served: tuple[control.ControlServer, FakeMachine, str], tmp_path: Path
) -> None:
    _, _, path = served
    answer = request(path, command="snapshot", to=str(tmp_path / "snap"))
    assert answer["ok"] is False and answer["kind"] in ("internal", "failed"), answer
    assert "has no" in answer["error"]
    assert not list(tmp_path.glob("snap*")), "a failed snapshot leaves no file"
    assert request(path, command="status")["ok"] is True


def test_a_dribbling_client_is_cut_off_at_the_request_deadline(
    served: tuple[control.ControlServer, FakeMachine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, path = served
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 1.0)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        started = time.monotonic()
        answer = b""
        for byte in b'{"command": "status"}':  # one byte every 0.25 s: 5 s in all
            try:
                client.sendall(bytes([byte]))
            except OSError:  # answered and closed while we slept: the answer waits unread
                client.settimeout(1.0)
                answer = client.recv(4096)
                break
            client.settimeout(0.25)
            try:
                answer = client.recv(4096)
            except TimeoutError:
                continue
            break
        elapsed = time.monotonic() - started
    assert b'"refused"' in answer and b"within 1 s" in answer, answer
    assert elapsed < 3.0


def test_silent_clients_do_not_keep_others_waiting(
    served: tuple[control.ControlServer, FakeMachine, str],
) -> None:
    _, _, path = served
    silent = []
    try:
        for _ in range(control.MAX_CLIENTS - 1):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            silent.append(sock)
        started = time.monotonic()
        assert request(path, command="status")["report"] == {"state": "running"}
        assert time.monotonic() - started < 2.0
    finally:
        for sock in silent:
            sock.close()


def test_thirty_two_concurrent_clients_each_get_an_answer(
    served: tuple[control.ControlServer, FakeMachine, str],
) -> None:
    _, _, path = served
    held = []
    answers: list[dict[str, Any]] = []
    try:
        for _ in range(control.MAX_CLIENTS):  # every slot taken by a client that says nothing
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            held.append(sock)
        time.sleep(0.2)
        threads = [
            threading.Thread(target=lambda: answers.append(request(path, command="status")))
            for _ in range(32)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
    finally:
        for sock in held:
            sock.close()
    assert len(answers) == 32
    assert all(a["ok"] is False and a["kind"] == "busy" for a in answers), answers
    # Slots free again once their threads have seen the hang-ups (not instantly under load).
    deadline = time.monotonic() + 5.0
    while (answer := request(path, command="status"))["ok"] is not True:
        assert answer["kind"] == "busy" and time.monotonic() < deadline, answer
        time.sleep(0.05)


def test_while_an_operation_runs_others_are_busy_and_cancel_reaches_it(
    served: tuple[control.ControlServer, FakeMachine, str], tmp_path: Path
) -> None:
    server, machine, path = served
    cancelled: list[int] = []

    def cancel() -> bool:
        cancelled.append(1)
        return True

    with server.occupied("a migration to unix:/t", cancel):
        answer = request(path, command="snapshot", to=str(tmp_path / "s"))
        assert answer["kind"] == "busy" and "a migration to unix:/t" in answer["error"]
        assert request(path, command="status")["report"]["state"] == "busy"
        assert request(path, command="cancel")["report"] == {"cancelled": "a migration to unix:/t"}
        assert cancelled == [1]
    assert request(path, command="status")["report"] == {"state": "running"}
    assert machine.calls == []


def test_too_late_to_cancel_after_the_go_ahead(
    served: tuple[control.ControlServer, FakeMachine, str],
) -> None:
    server, _, path = served
    with server.occupied("a migration to unix:/t", lambda: False):
        answer = request(path, command="cancel")
    assert answer["kind"] == "busy" and "go-ahead" in answer["error"]


def test_a_held_guest_waits_for_resume_or_quit(
    served: tuple[control.ControlServer, FakeMachine, str], tmp_path: Path
) -> None:
    from guestmem.vmm.handover import Hold

    server, machine, path = served
    decided: list[str] = []
    server.hold(Hold("the go-ahead was lost", lambda: decided.append("resume"), lambda: None))
    status = request(path, command="status")["report"]
    assert status == {"state": "held", "reason": "the go-ahead was lost"}
    answer = request(path, command="snapshot", to=str(tmp_path / "s"))
    assert answer["kind"] == "busy" and "resume or quit" in answer["error"]
    assert request(path, command="resume")["report"] == {"resumed": True}
    assert decided == ["resume"]
    assert request(path, command="resume")["kind"] == "refused"  # decided once
    assert request(path, command="quit")["report"] == {"quit": True}
    assert machine.calls == ["stop:quit"]


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022])
def test_the_socket_is_its_owners_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "control"
    old = os.umask(umask)
    try:
        server = control.ControlServer(FakeMachine(), str(path))  # type: ignore[arg-type]
    finally:
        os.umask(old)
    try:
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    finally:
        server.close()


def test_a_second_vmm_cannot_take_a_live_socket(
    served: tuple[control.ControlServer, FakeMachine, str],
) -> None:
    _, _, path = served
    with pytest.raises(gm.UsageError, match="another process"):
        control.ControlServer(FakeMachine(), path)  # type: ignore[arg-type]
    assert request(path, command="status")["ok"] is True


def test_a_stale_socket_is_replaced_and_a_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))
    control.ControlServer(FakeMachine(), str(stale)).close()  # type: ignore[arg-type]
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    with pytest.raises(gm.UsageError):
        control.ControlServer(FakeMachine(), str(precious))  # type: ignore[arg-type]
    assert precious.read_text() == "keep me"
    assert not stale.exists()  # closed: its file went with it
