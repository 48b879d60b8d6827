"""The control server's typed requests and answers, and the JSON each stands for."""

from __future__ import annotations

import pytest

from guestmem.vmm import control
from guestmem.vmm.control import Answer, AnswerKind, Command


def test_each_request_is_parsed_into_its_type() -> None:
    assert control.parse_request({"command": "snapshot", "to": "/s"}) == control.Snapshot("/s")
    migrate = control.parse_request({"command": "migrate", "to": "unix:/m", "max_rounds": 3})
    assert isinstance(migrate, control.Migrate)
    assert str(migrate.where) == "unix:/m" and migrate.options.max_rounds == 3
    assert migrate.tls is None and migrate.allow_insecure is False
    for command in ("cancel", "resume", "quit", "status"):
        parsed = control.parse_request({"command": command})
        assert parsed == control.Decision(Command(command))


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"command": "reboot"}, "not a command this VMM knows: 'reboot'"),
        ({"command": ["status"]}, "not a command this VMM knows"),
        ({}, "not a command this VMM knows: None"),
        ({"command": "status", "to": "/x"}, "status takes no 'to'"),
        ({"command": "snapshot"}, "snapshot needs 'to'"),
        ({"command": "migrate", "to": "nowhere"}, "not an endpoint"),
    ],
)
def test_a_request_this_vmm_does_not_take_is_refused(fields: dict[str, object], says: str) -> None:
    with pytest.raises(control.Refused, match=says) as caught:
        control.parse_request(fields)
    assert caught.value.kind is AnswerKind.REFUSED


def test_answers_keep_their_wire_format() -> None:
    assert Answer(AnswerKind.OK, report={"a": 1}).wire() == {"ok": True, "report": {"a": 1}}
    assert Answer(AnswerKind.BUSY, error="busy: x").wire() == {
        "ok": False, "kind": "busy", "error": "busy: x"
    }  # fmt: skip
    failed = Answer(AnswerKind.FAILED, error="no", paused_ms=12).wire()
    assert failed == {"ok": False, "kind": "failed", "error": "no", "paused_ms": 12}
    assert {kind.value for kind in AnswerKind} == {
        "ok", "refused", "busy", "failed", "held", "internal"
    }  # fmt: skip
