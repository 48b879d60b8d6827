"""One validator for every reader of a stream: inspect checks what restore
checks, claims are checked before memory is mapped, trailing data is always
found, a tagless source brings no tags, a quiet sender is an error, and the
checksum is what docs/stream-format.md says it is."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from guestmem import migration
from guestmem.migration.stream import BATCH_PAGES, RECORD_MAX
from guestmem.tools import migrate
from test_migration import LAYOUT, header_with, memory, page_record, saved, small_stream


def end_record(pages: int) -> bytes:
    head = (3 | (pages << 16)).to_bytes(8, "little")
    return head + migration.header.checksum(head).to_bytes(8, "little")


BAD_TABLES = {
    "empty": [(0x4000_0000, 0)],
    "not whole pages": [(0x4000_0100, 0x1000)],
    "wraps past 2\\*\\*64": [(2**64 - 0x1000, 0x2000)],
    "overlaps or precedes": [(0x4000_0000, 0x2000), (0x4000_1000, 0x1000)],
    "precedes": [(0x5000_0000, 0x1000), (0x4000_0000, 0x1000)],
}


@pytest.mark.parametrize("reason", list(BAD_TABLES))
def test_bad_region_tables_fail_inspect_and_restore_alike(reason: str) -> None:
    stream = header_with(BAD_TABLES[reason]) + end_record(0)
    with pytest.raises(gm.StreamError, match=reason):
        migration.inspect(io.BytesIO(stream))
    with memory(gm.TagMode.SOFTWARE) as target, pytest.raises(gm.StreamError, match=reason):
        migration.restore(io.BytesIO(stream), target)


def test_inspect_finds_a_page_outside_the_regions() -> None:
    stream = header_with() + page_record(0x5000_0000 // 4096) + end_record(1)
    with pytest.raises(gm.StreamError, match="outside the declared regions") as caught:
        migration.inspect(io.BytesIO(stream))
    assert caught.value.offset == len(header_with())


def test_a_tagless_source_brings_no_tags() -> None:
    tagged_page = page_record(LAYOUT[0][0] // 4096, flags=1)[:8]  # zero data, tags follow
    body = tagged_page + bytes([0x21] * 128)
    record = body + migration.header.checksum(body).to_bytes(8, "little")
    stream = header_with(mode=int(gm.TagMode.NONE)) + record + end_record(1)
    with pytest.raises(gm.StreamError, match="source had no tags"):
        migration.inspect(io.BytesIO(stream))
    with memory(gm.TagMode.SOFTWARE) as target:
        with pytest.raises(gm.StreamError, match="source had no tags"):
            migration.restore(io.BytesIO(stream), target)
        assert not target.get_tags(LAYOUT[0][0], 4096).any()
    # The same page from a tagged source is applied.
    with memory(gm.TagMode.SOFTWARE) as target:
        migration.restore(io.BytesIO(header_with(mode=1) + record + end_record(1)), target)
        assert target.get_tags(LAYOUT[0][0], 32).tolist() == [1, 2]


class Chunked(io.RawIOBase):
    """A file that hands out its bytes in the chunks given, one per read."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = [c for c in chunks if c]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self._chunks:
            return 0
        chunk = self._chunks.pop(0)
        n = min(len(chunk), len(buffer))
        buffer[:n] = chunk[:n]
        if n < len(chunk):
            self._chunks.insert(0, chunk[n:])
        return n


def test_trailing_data_is_found_when_the_end_record_ends_a_read() -> None:
    stream = small_stream()
    assert len(stream) < RECORD_MAX * BATCH_PAGES  # the whole stream is one read
    with (
        memory(gm.TagMode.SOFTWARE) as target,
        pytest.raises(gm.StreamError, match="after the end"),
    ):
        migration.restore(Chunked(stream, b"junk"), target)  # type: ignore[arg-type]
    with pytest.raises(gm.StreamError, match="after the end"):
        migration.inspect(Chunked(stream, b"junk"))  # type: ignore[arg-type]


def test_trailing_data_on_a_socket_is_found() -> None:
    a, b = socket.socketpair()
    with a, b, memory(gm.TagMode.SOFTWARE) as target:
        a.sendall(small_stream() + b"junk")
        with pytest.raises(gm.StreamError, match="after the end"):
            migration.receive(b, target)


def test_a_quiet_sender_is_a_stream_error_with_the_offset() -> None:
    a, b = socket.socketpair()
    with a, b, memory(gm.TagMode.SOFTWARE) as target:
        header = small_stream()[: len(header_with())]
        a.sendall(header)
        with pytest.raises(gm.StreamError, match=r"sent nothing for 0\.3 s") as caught:
            migration.receive(b, target, idle_timeout=0.3)
        assert caught.value.offset == len(header)
        assert b.gettimeout() is None  # the socket is left as it was


def test_send_live_leaves_a_dirty_log_the_vmm_runs() -> None:
    with memory(gm.TagMode.SOFTWARE) as src, memory(gm.TagMode.SOFTWARE) as dst:
        src.dirty.start()
        src.write(LAYOUT[0][0], b"before")
        a, b = socket.socketpair()
        with a, b:
            received: list[migration.Totals] = []
            thread = threading.Thread(target=lambda: received.append(migration.receive(b, dst)))
            thread.start()
            migration.send_live(src, a, pause=lambda: None)
            thread.join(60)
        assert received and dst.read(LAYOUT[0][0], 6) == b"before"
        assert src.dirty.active  # still the VMM's
        src.write(LAYOUT[1][0], b"after")
        assert src.dirty.take().numbers.tolist() == [LAYOUT[1][0] // gm.HOST_PAGE]


def _keep_dirtying(src: gm.GuestMemory, stop: threading.Event) -> None:
    while not stop.is_set():
        for gpa, size in LAYOUT:
            src.write(gpa, b"x" * size)


class _SlowSink(io.BytesIO):
    """A sink slow enough that a writer thread dirties pages during every round."""

    def write(self, data: object) -> int:
        time.sleep(0.005)
        return super().write(data)  # type: ignore[arg-type]


def test_a_migration_that_cannot_fit_its_downtime_fails_before_the_pause() -> None:
    with memory(gm.TagMode.SOFTWARE) as src:
        stop = threading.Event()
        writer = threading.Thread(target=_keep_dirtying, args=(src, stop))
        writer.start()
        paused: list[int] = []
        slowed: list[int] = []
        try:
            with pytest.raises(gm.ConvergenceError, match="never paused"):
                migration.send_live(
                    src,
                    _SlowSink(),
                    pause=lambda: paused.append(1),
                    max_rounds=3,
                    max_downtime=1e-9,
                    slow_down=slowed.append,
                )
        finally:
            stop.set()
            writer.join()
        assert not paused and slowed == [1, 2, 3]


def test_a_migration_whose_rest_fits_its_downtime_pauses_and_ends() -> None:
    with memory(gm.TagMode.SOFTWARE) as src, memory(gm.TagMode.SOFTWARE) as dst:
        src.write(LAYOUT[0][0], b"kept")
        sink = io.BytesIO()
        paused: list[int] = []
        migration.send_live(
            src, sink, pause=lambda: paused.append(1), max_rounds=3, max_downtime=60.0
        )
        assert paused == [1]
        migration.restore(io.BytesIO(sink.getvalue()), dst)
        assert dst.read(LAYOUT[0][0], 4) == b"kept"


def test_the_final_round_estimate_grows_with_pages_and_shrinks_with_rate() -> None:
    estimate = migration.live.final_round_estimate
    assert estimate(0, 1.0) == 0.0
    assert estimate(100, 1e6) == pytest.approx(100 * RECORD_MAX / 1e6)
    assert estimate(200, 1e6) > estimate(100, 1e6) > estimate(100, 2e6)
    assert estimate(1, 0.0) == RECORD_MAX  # no rate measured: a pessimistic byte a second


# ---- claims before mapping, and the operator's command line ------------------------------


def claiming(size: int) -> bytes:
    return header_with([(0x4000_0000, size)]) + end_record(0)


def test_a_short_stream_claiming_much_memory_is_refused_before_mapping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    liar = tmp_path / "liar.gms"
    liar.write_bytes(claiming(1 << 30))  # 68 bytes that claim 1 GiB

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("guest memory was mapped for an unchecked claim")

    monkeypatch.setattr(gm.GuestMemory, "from_layout", refuse)
    assert migrate.cli_main(["migrate", "restore", str(liar)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes at least" in err
    assert migrate.cli_main(["inspect", str(liar)]) == 1
    assert "takes at least" in capsys.readouterr().err


def test_claims_over_the_memory_limit_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "guest.gms"
    with memory(gm.TagMode.SOFTWARE) as mem:
        image.write_bytes(saved(mem))
    assert migrate.cli_main(["inspect", str(image), "--max-memory", "64K"]) == 1
    assert "over the limit of 65536" in capsys.readouterr().err
    assert migrate.cli_main(["inspect", str(image), "--max-memory", "1M"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/missing.gms"], "No such file or directory"),
        (["inspect", "{tmp}"], "Is a directory"),
        (["migrate", "save", "{tmp}/no/such/dir/x.gms", "--size-mib", "1"], "No such file"),
        (["migrate", "send", "--to", "unix:{tmp}/nobody.sock", "--size-mib", "1"], "No such"),
    ],
)
def test_operator_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert migrate.cli_main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("guestmem: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    "argv",
    [
        ["migrate", "restore", "x.gms", "--tags", "bogus"],
        ["inspect", "x.gms", "--max-memory", "lots"],
        ["migrate", "send", "--to", "localhost"],
        ["migrate", "receive", "--listen", "unix:"],
        ["migrate", "save", "x.gms", "--size-mib", "0"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        migrate.cli_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


# ---- the checksum, from the document ------------------------------------------------------

P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
MASK = 2**64 - 1


def rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK


def documented_checksum(data: bytes) -> int:
    """docs/stream-format.md's checksum, written from the text alone."""
    n = len(data)

    def w(i: int) -> int:
        return int.from_bytes(data[i : i + 8], "little")

    a, b, c, d = P1, P2, P1 ^ P2, ~P1 & MASK
    i = 0
    while i + 32 <= n:
        a = ((a ^ w(i)) * P1) & MASK
        b = ((b ^ w(i + 8)) * P1) & MASK
        c = ((c ^ w(i + 16)) * P1) & MASK
        d = ((d ^ w(i + 24)) * P1) & MASK
        i += 32
    h = a ^ rotl(b, 16) ^ rotl(c, 32) ^ rotl(d, 48)
    while i + 8 <= n:
        h = ((h ^ w(i)) * P2) & MASK
        i += 8
    while i < n:
        h = ((h ^ data[i]) * P1) & MASK
        i += 1
    h ^= (n * P2) & MASK
    h ^= h >> 33
    h = (h * P1) & MASK
    h ^= h >> 29
    return h


@given(data=st.binary(max_size=300))
def test_the_documented_checksum_is_the_cores(data: bytes) -> None:
    assert documented_checksum(data) == migration.header.checksum(data)


def test_the_documented_checksum_verifies_a_real_stream() -> None:
    stream = small_stream()
    header = header_with()
    body = stream[: len(header) - 8]
    assert documented_checksum(body) == int.from_bytes(stream[len(body) : len(header)], "little")


def test_whether_more_arrived_never_waits_for_it() -> None:
    from guestmem.migration.stream import more_arrived

    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5.0)  # Python waits out a timeout on EAGAIN unless told not to
        started = time.monotonic()
        assert more_arrived(b) is False
        assert time.monotonic() - started < 1.0
        assert b.gettimeout() == 5.0
        a.sendall(b"x")
        time.sleep(0.05)
        assert more_arrived(b) is True and b.recv(1) == b"x"  # peeked, not taken
