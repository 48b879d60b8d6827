"""``guestmem migrate`` and ``guestmem inspect`` from the command line."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from guestmem.tools.migrate import cli_main


def digests(text: str) -> list[str]:
    return re.findall(r"digest ([0-9a-f]{64})", text)


def test_save_inspect_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "guest.gms"
    assert cli_main(["migrate", "save", str(image), "--size-mib", "2", "--tags", "software"]) == 0
    assert cli_main(["inspect", str(image)]) == 0
    assert cli_main(["migrate", "restore", str(image), "--tags", "software"]) == 0
    out = capsys.readouterr().out
    saved, restored = digests(out)
    assert saved == restored
    assert "pages 512, rounds 0" in out
    assert "region 0x000040000000 .. 0x000040200000  (2 MiB)" in out


def test_live_send_and_receive_over_a_unix_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = f"unix:{tmp_path / 'live.sock'}"
    args = ["--size-mib", "2", "--tags", "software"]
    receiver = threading.Thread(
        target=cli_main, args=(["migrate", "receive", "--listen", where, *args],)
    )
    receiver.start()
    for _ in range(100):
        if (tmp_path / "live.sock").exists():
            break
        time.sleep(0.05)
    assert cli_main(["migrate", "send", "--to", where, *args]) == 0
    receiver.join(60)
    captured = capsys.readouterr()
    sent, received = sorted(digests(captured.out), key=captured.out.index)
    assert sent == received
    assert "done" in captured.err and "round" in captured.err  # the progress bar


def test_a_bad_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gms"
    bad.write_bytes(b"not a stream at all" * 4)
    assert cli_main(["inspect", str(bad)]) == 1
    assert "bad magic" in capsys.readouterr().err
