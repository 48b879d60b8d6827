"""``guestmem vmm`` from an operator's side: what a careless command or an odd VMM gets.

The control clients talk to a stand-in VMM (a socket the test answers);
``vmm run`` is refused before it builds a machine. Host lane: no KVM.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestmem.tools.cli import main


class StandIn:
    """A control socket that records each request and answers with ``reply`` bytes."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.requests: list[dict[str, object]] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(1)
        self._reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with client:
                self.requests.append(json.loads(client.makefile("rb").readline()))
                client.sendall(self._reply)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def stand_in(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StandIn]:
    server = StandIn(tmp_path / "control", request.param)
    yield server
    server.close()


OK = b'{"ok": true, "report": {"pages": 1}}\n'


@pytest.mark.parametrize("stand_in", [OK], indirect=True)
def test_paths_are_resolved_by_the_client(
    stand_in: StandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    control = str(tmp_path / "control")
    assert main(["vmm", "snapshot", "--control", control, "--to", "snap/guest.img"]) == 0
    assert main(["vmm", "migrate", "--control", control, "--to", "unix:in.sock"]) == 0
    snapshot, migrate = stand_in.requests
    assert snapshot == {"command": "snapshot", "to": str(tmp_path / "snap/guest.img")}
    assert migrate["to"] == f"unix:{tmp_path / 'in.sock'}"
    assert migrate["max_downtime_ms"] == 300 and migrate["timeout"] == 10.0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"pages": 1}


@pytest.mark.parametrize(
    ("stand_in", "says"),
    [
        (b"not json\n", "not JSON"),
        (b"[1]\n", "hung up without answering"),
        (b"", "hung up without answering"),
        (b'{"ok": false}\n', "does not know"),
        (b'{"ok": true}\n', "does not know"),
    ],
    indirect=["stand_in"],
    ids=["garbage", "not-object", "silent", "no-error", "no-report"],
)
def test_an_odd_answer_is_one_line_naming_the_socket(
    stand_in: StandIn, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    control = str(tmp_path / "control")
    assert main(["vmm", "status", "--control", control]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert control in err and says in err, err


@pytest.mark.parametrize(
    ("stand_in", "status"),
    [
        (b'{"ok": false, "kind": "failed", "error": "the target refused", "paused_ms": 12}\n', 1),
        (b'{"ok": false, "kind": "held", "error": "outcome unknown: lost"}\n', 3),
        (b'{"ok": false, "kind": "busy", "error": "busy: a snapshot"}\n', 1),
    ],
    indirect=["stand_in"],
    ids=["failed", "held", "busy"],
)
def test_a_refusal_is_one_line_and_an_exit_status(
    stand_in: StandIn, status: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    control = str(tmp_path / "control")
    assert main(["vmm", "migrate", "--control", control, "--to", "unix:/t"]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("guestmem vmm: migrate: "), err
    if status == 1 and "refused" in err:
        assert err.endswith("(the guest was paused 12 ms)")


def test_a_missing_control_socket_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    control = str(tmp_path / "nowhere")
    assert main(["vmm", "quit", "--control", control]) == 1
    err = capsys.readouterr().err
    assert control in err and "No such file" in err and "Traceback" not in err, err


def test_restore_opens_its_file_before_building_a_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.snapshot"
    assert main(["vmm", "run", "--restore", str(missing), "--tags", "kvm"]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "No such file" in err, err
    assert "KVM" not in err and "kvm" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--max-downtime", "0"],
        ["--max-rounds", "65"],
        ["--timeout", "0"],
        ["--timeout", "nan"],
        ["--tls-cert", "c.pem"],
    ],
)
def test_bad_migrate_flags_are_refused_before_the_vmm_is_asked(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    control = str(tmp_path / "nowhere")  # nothing listens: a request would fail differently
    with pytest.raises(SystemExit) as exited:
        status = main(["vmm", "migrate", "--control", control, "--to", "unix:/t", *args])
        raise SystemExit(status)
    err = capsys.readouterr().err
    assert exited.value.code in (1, 2) and "No such file" not in err, err
    assert not os.path.exists(control)
