"""Migration channels: endpoints, owner-only unix sockets, mutual TLS, and the plain-tcp rule."""

from __future__ import annotations

import errno
import io
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import guestmem as gm
from conftest import LANE
from guestmem import migration
from guestmem.errors import (
    ChannelError,
    ChannelTimeoutError,
    GuestMemoryError,
    InsecureChannelWarning,
    StreamError,
    UsageError,
)
from guestmem.migration.channel import (
    Endpoint,
    Listener,
    TlsConfig,
    connect,
    listen,
    parse_endpoint,
)
from guestmem.tools.migrate import cli_main
from tls_certs import OPENSSL, Certificates, Pair, make_certificates

# The host lane installs openssl (scripts/host-deps.sh): there, a missing one fails the run.
REQUIRED = LANE == "host" and os.environ.get("CI") == "true"
needs_openssl = pytest.mark.skipif(
    OPENSSL is None and not REQUIRED, reason="no openssl command to make certificates"
)
LOOPBACK_ANY_PORT = Endpoint("tcp", host="127.0.0.1", port=0)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if OPENSSL is None:
        if REQUIRED:
            pytest.fail("no openssl command: scripts/host-deps.sh installs it for the host lane")
        pytest.skip("no openssl command to make certificates")
    return make_certificates(tmp_path_factory.mktemp("certs"))


def tls(pair: Pair, ca: Path) -> TlsConfig:
    return TlsConfig(str(pair.cert), str(pair.key), str(ca))


@contextmanager
def serving(listener: Listener, clients: int = 1) -> Iterator[list[Future[Any]]]:
    """Accept ``clients`` clients on a thread; each future is an echo of 5 bytes, or its error."""

    def one() -> bytes:
        with listener.accept(timeout=20) as conn:
            data = conn.recv(5)
            conn.sendall(data.upper())
            return data

    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(one) for _ in range(clients)]
        yield futures


def port_of(listener: Listener) -> int:
    assert listener.endpoint.port is not None
    return listener.endpoint.port


def echo(sock: socket.socket) -> bytes:
    with sock:
        sock.sendall(b"hello")
        return sock.recv(5)


# --- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/vm.sock", Endpoint("unix", path="/run/vm.sock")),
        ("unix:rel/vm.sock", Endpoint("unix", path="rel/vm.sock")),
        ("unix:a:b", Endpoint("unix", path="a:b")),
        ("127.0.0.1:4444", Endpoint("tcp", host="127.0.0.1", port=4444)),
        ("tcp:127.0.0.1:4444", Endpoint("tcp", host="127.0.0.1", port=4444)),
        ("tcp:target.example:1", Endpoint("tcp", host="target.example", port=1)),
        (":65535", Endpoint("tcp", host="127.0.0.1", port=65535)),
        ("[::1]:4444", Endpoint("tcp", host="::1", port=4444)),
        ("tcp:[fe80::1]:80", Endpoint("tcp", host="fe80::1", port=80)),
    ],
)
def test_parse_endpoint_accepts(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected
    assert parse_endpoint(str(expected)) == expected  # the text round trip


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix:",
        "unix:a\0b",
        "4444",
        "host:",
        "host:0",
        "host:65536",
        "host:-1",
        "host:port",
        "host:٤٤",  # digits, but not ASCII ones
        "::1:4444",  # IPv6 without brackets is ambiguous
        "[::1:4444",
        "[127.0.0.1]:4444",
        "[nonsense]:4444",
        "tcp:unix:/x",
        "host name:80",
        "a/b:80",
    ],
)
def test_parse_endpoint_refuses_naming_the_text(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_endpoint(text)
    assert repr(text) in str(caught.value)


def test_str_gives_the_canonical_text() -> None:
    assert str(parse_endpoint("127.0.0.1:80")) == "tcp:127.0.0.1:80"
    assert str(parse_endpoint("[::1]:80")) == "tcp:[::1]:80"
    assert str(parse_endpoint("unix:x.sock")) == "unix:x.sock"


def test_an_endpoint_made_by_hand_is_checked() -> None:
    with pytest.raises(UsageError):
        Endpoint("tcp", host="h", port=70000)
    with pytest.raises(UsageError):
        Endpoint("unix", path="p", port=1)
    with pytest.raises(UsageError):
        Endpoint("udp", host="h", port=1)  # type: ignore[arg-type]


def test_resolved_makes_a_relative_unix_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_endpoint("unix:sub/vm.sock").resolved() == Endpoint(
        "unix", path=str(tmp_path / "sub" / "vm.sock")
    )
    assert parse_endpoint("unix:/abs.sock").resolved().path == "/abs.sock"
    tcp = parse_endpoint("tcp:h:1")
    assert tcp.resolved() == tcp


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
        ("target.example", False),
    ],
)
def test_loopback_is_judged_from_the_text(host: str, loopback: bool) -> None:
    assert Endpoint("tcp", host=host, port=1).loopback is loopback


# --- TLS configs -------------------------------------------------------------------------


def test_a_missing_certificate_file_is_named(certs: Certificates, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    for args, named in (
        ((missing, str(certs.client.key), str(certs.ca)), "certificate"),
        ((str(certs.client.cert), missing, str(certs.ca)), "key"),
        ((str(certs.client.cert), str(certs.client.key), missing), "CA certificate"),
    ):
        with pytest.raises(UsageError) as caught:
            TlsConfig(*args)
        assert f"TLS {named} {missing}: No such file or directory" in str(caught.value)


def test_files_that_are_not_pem_are_named(certs: Certificates, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00not a certificate\n" * 10)
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    for bad in (junk, tmp_path, fifo):  # a FIFO must not block the check
        with pytest.raises(UsageError, match=str(bad)):
            TlsConfig(str(certs.client.cert), str(certs.client.key), str(bad))
    with pytest.raises(UsageError, match=f"TLS key {certs.client.cert}"):
        TlsConfig(str(certs.client.cert), str(certs.client.cert), str(certs.ca))


def test_a_key_of_another_certificate_is_refused(certs: Certificates) -> None:
    with pytest.raises(UsageError, match="the key is not the certificate's"):
        TlsConfig(str(certs.client.cert), str(certs.server.key), str(certs.ca))


@needs_openssl
def test_a_key_with_a_passphrase_is_refused(certs: Certificates, tmp_path: Path) -> None:
    locked = tmp_path / "locked.key"
    subprocess.run(
        [OPENSSL or "openssl", "pkey", "-in", certs.client.key, "-aes256", "-passout",
         "pass:x", "-out", locked],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with pytest.raises(UsageError, match=f"{locked}: has a passphrase"):
        TlsConfig(str(certs.client.cert), str(locked), str(certs.ca))


# --- mutual TLS --------------------------------------------------------------------------


def test_mutual_tls_carries_bytes_both_ways(certs: Certificates) -> None:
    with listen(LOOPBACK_ANY_PORT, tls=tls(certs.server, certs.ca)) as listener:
        assert listener.tls and listener.endpoint.port != 0
        with serving(listener) as (server,):
            sock = connect(listener.endpoint, tls=tls(certs.client, certs.ca), timeout=20)
            assert isinstance(sock, ssl.SSLSocket)
            assert sock.version() == "TLSv1.3"
            assert sock.gettimeout() is None
            assert echo(sock) == b"HELLO"
            assert server.result() == b"hello"


def test_tls_1_2_is_refused(certs: Certificates) -> None:
    with (
        listen(LOOPBACK_ANY_PORT, tls=tls(certs.server, certs.ca)) as listener,
        serving(listener) as (server,),
    ):
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        old.load_verify_locations(certs.ca)
        old.load_cert_chain(certs.client.cert, certs.client.key)
        raw = socket.create_connection(("127.0.0.1", port_of(listener)), timeout=20)
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1").close()
        with pytest.raises(ChannelError, match="TLS handshake with"):
            server.result()


@pytest.mark.parametrize("extra", [b"", b"x"])
def test_a_stream_over_tls_is_received_whole_and_bytes_after_it_refused(
    certs: Certificates, extra: bytes
) -> None:
    # TLS cannot peek: the check for data after the end record reads instead.
    with gm.GuestMemory.anonymous(64 << 10, gpa=0x4000_0000, tags="software") as source:
        source.write(0x4000_0000, b"guest" * 100)
        stream = io.BytesIO()
        migration.save(source, stream)
    data = stream.getvalue()

    def send() -> None:
        with connect(listener.endpoint, tls=tls(certs.client, certs.ca)) as sock:
            sock.sendall(data[:-16])
            sock.sendall(data[-16:] + extra)  # one TLS record: end record and extra
            sock.recv(1)  # until the receiver is done

    with (
        listen(LOOPBACK_ANY_PORT, tls=tls(certs.server, certs.ca)) as listener,
        ThreadPoolExecutor(1) as pool,
    ):
        sent = pool.submit(send)
        with (
            listener.accept(timeout=20) as conn,
            gm.GuestMemory.anonymous(64 << 10, gpa=0x4000_0000, tags="software") as target,
        ):
            if extra:
                with pytest.raises(StreamError, match="data after the end record"):
                    migration.restore(conn, target)
            else:
                migration.restore(conn, target)
                assert target.read(0x4000_0000, 500) == b"guest" * 100
        sent.result(timeout=20)


def test_a_client_certificate_from_another_ca_is_refused_and_the_next_client_served(
    certs: Certificates,
) -> None:
    with (
        listen(LOOPBACK_ANY_PORT, tls=tls(certs.server, certs.ca)) as listener,
        serving(listener, clients=2) as (first, second),
    ):
        stranger = tls(certs.other_client, certs.ca)  # trusts the server, is not trusted
        with pytest.raises(ChannelError, match="does not trust this side's certificate"):
            connect(listener.endpoint, tls=stranger, timeout=20)
        with pytest.raises(ChannelError) as refused:
            first.result()
        assert "TLS handshake with 127.0.0.1:" in str(refused.value)
        assert "certificate was refused" in str(refused.value)
        assert echo(connect(listener.endpoint, tls=tls(certs.client, certs.ca))) == b"HELLO"
        assert second.result() == b"hello"


def test_a_client_without_a_certificate_is_refused(certs: Certificates) -> None:
    with (
        listen(LOOPBACK_ANY_PORT, tls=tls(certs.server, certs.ca)) as listener,
        serving(listener) as (server,),
    ):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(certs.ca)
        raw = socket.create_connection(("127.0.0.1", port_of(listener)), timeout=20)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as anonymous:
            try:  # TLS 1.3: the server's alert comes after the client's handshake
                answer = anonymous.recv(1)
            except OSError:
                answer = b""
            assert answer == b""  # never the byte that says it was accepted
        with pytest.raises(ChannelError, match="the peer sent no certificate"):
            server.result()


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(
    certs: Certificates,
) -> None:
    impostor = tls(certs.other_server, certs.ca)  # would trust our client, is not trusted
    with listen(LOOPBACK_ANY_PORT, tls=impostor) as listener, serving(listener) as (server,):
        with pytest.raises(ChannelError) as refused:
            connect(listener.endpoint, tls=tls(certs.client, certs.ca), timeout=20)
        assert "certificate was refused" in str(refused.value)
        assert str(listener.endpoint) in str(refused.value)
        with pytest.raises(ChannelError):
            server.result()


def test_the_server_certificate_must_name_the_host_dialled(certs: Certificates) -> None:
    # The server's certificate names 127.0.0.1 and localhost, not 127.0.0.2.
    try:
        listener = listen(
            Endpoint("tcp", host="127.0.0.2", port=0), tls=tls(certs.server, certs.ca)
        )
    except ChannelError as error:
        pytest.skip(f"127.0.0.2 cannot be bound here: {error}")
    with listener, serving(listener) as (server,):
        with pytest.raises(ChannelError, match="IP address mismatch"):
            connect(listener.endpoint, tls=tls(certs.client, certs.ca), timeout=20)
        with pytest.raises(ChannelError):
            server.result()


def test_a_plain_client_meets_a_tls_listener_as_a_failed_handshake(certs: Certificates) -> None:
    with (
        listen(LOOPBACK_ANY_PORT, tls=tls(certs.server, certs.ca)) as listener,
        serving(listener) as (server,),
        connect(listener.endpoint, timeout=20) as plain,
    ):
        plain.sendall(b"GMVMMOVE not a TLS hello")
        with pytest.raises(ChannelError, match="TLS handshake with"):
            server.result()


def test_a_tls_client_meets_a_plain_listener_as_a_failed_handshake(certs: Certificates) -> None:
    with (
        listen(LOOPBACK_ANY_PORT) as listener,
        serving(listener),
        pytest.raises(ChannelError, match="TLS handshake failed"),
    ):
        connect(listener.endpoint, tls=tls(certs.client, certs.ca), timeout=20)


def test_tls_on_a_unix_endpoint_is_a_usage_error(certs: Certificates, tmp_path: Path) -> None:
    where = Endpoint("unix", path=str(tmp_path / "s"))
    with pytest.raises(UsageError, match="TLS is for tcp"):
        listen(where, tls=tls(certs.server, certs.ca))
    with pytest.raises(UsageError, match="TLS is for tcp"):
        connect(where, tls=tls(certs.client, certs.ca))
    assert not (tmp_path / "s").exists()


# --- plain tcp off loopback --------------------------------------------------------------


def forbid_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("a connection was tried")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "create_server", refuse)


def test_plain_tcp_off_loopback_is_refused_before_any_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid_connects(monkeypatch)
    with pytest.raises(UsageError, match=r"use TLS .* or allow it explicitly"):
        connect(parse_endpoint("tcp:192.0.2.1:4444"))
    with pytest.raises(UsageError, match=r"tcp:0\.0\.0\.0:4444: plain tcp"):
        listen(parse_endpoint("tcp:0.0.0.0:4444"))
    with pytest.raises(UsageError):
        connect(parse_endpoint("tcp:target.example:4444"))


def test_plain_tcp_off_loopback_with_the_opt_in_warns_and_proceeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = socket.socketpair()
    dialled: list[object] = []

    def fake(address: object, timeout: object = None) -> socket.socket:
        dialled.append(address)
        return ours

    monkeypatch.setattr(socket, "create_connection", fake)
    with pytest.warns(InsecureChannelWarning, match="tcp:192.0.2.1:4444: plain tcp"):
        sock = connect(parse_endpoint("tcp:192.0.2.1:4444"), allow_insecure=True)
    assert sock is ours and dialled == [("192.0.2.1", 4444)]
    ours.close()
    theirs.close()
    with (
        pytest.warns(InsecureChannelWarning),
        listen(Endpoint("tcp", host="0.0.0.0", port=0), allow_insecure=True) as listener,
    ):
        assert listener.endpoint.port != 0


def test_plain_tcp_on_loopback_needs_no_opt_in_and_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with listen(LOOPBACK_ANY_PORT) as listener, serving(listener) as (server,):
            assert echo(connect(listener.endpoint)) == b"HELLO"
            assert server.result() == b"hello"


# --- unix endpoints ----------------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_a_unix_listener_is_owner_only_under_umask_000_and_removed_by_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.sock"
    with umask(0), listen(Endpoint("unix", path=str(path))) as listener:
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        with serving(listener) as (server,):
            assert echo(connect(listener.endpoint, timeout=20)) == b"HELLO"
            assert server.result() == b"hello"
    assert not path.exists()


def test_a_listener_closed_early_or_refused_leaves_no_file_and_a_retry_binds(
    tmp_path: Path,
) -> None:
    where = Endpoint("unix", path=str(tmp_path / "in.sock"))
    listen(where).close()  # closed before any client
    assert not (tmp_path / "in.sock").exists()
    with pytest.raises(RuntimeError), listen(where):  # the migration in it was refused
        raise RuntimeError("the target refused the guest")
    assert not (tmp_path / "in.sock").exists()
    with listen(where) as again:
        assert again.endpoint == where


def test_close_leaves_a_socket_someone_else_put_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    listener = listen(Endpoint("unix", path=str(path)))
    path.unlink()
    path.write_text("not ours")
    listener.close()
    assert path.read_text() == "not ours"


def test_a_live_unix_listener_is_not_taken_over(tmp_path: Path) -> None:
    where = Endpoint("unix", path=str(tmp_path / "in.sock"))
    with listen(where), pytest.raises(UsageError, match="another process is serving"):
        listen(where)


def test_connecting_to_a_missing_socket_names_it(tmp_path: Path) -> None:
    where = Endpoint("unix", path=str(tmp_path / "absent.sock"))
    with pytest.raises(ChannelError) as caught:
        connect(where)
    assert str(caught.value) == f"{where}: cannot connect: No such file or directory"
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value, OSError) and isinstance(caught.value, GuestMemoryError)


def test_accept_times_out_and_close_wakes_a_waiting_accept(tmp_path: Path) -> None:
    listener = listen(Endpoint("unix", path=str(tmp_path / "in.sock")))
    with pytest.raises(ChannelTimeoutError, match=r"no peer within 0\.1 s") as caught:
        listener.accept(timeout=0.1)
    assert isinstance(caught.value, TimeoutError)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(listener.accept)
        time.sleep(0.2)
        listener.close()
        with pytest.raises(ChannelError):
            waiting.result(timeout=10)


def test_connect_refuses_port_zero() -> None:
    with pytest.raises(UsageError, match="port 0"):
        connect(LOOPBACK_ANY_PORT)


# --- the command line --------------------------------------------------------------------

MIGRATE = [sys.executable, "-m", "guestmem", "migrate"]
DEMO = ["--size-mib", "2", "--tags", "software"]


def tls_flags(pair: Pair, ca: Path) -> list[str]:
    return ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--tls-ca", str(ca)]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def start_receiver(*args: str) -> subprocess.Popen[str]:
    """A ``migrate receive`` child, once it says where it listens."""
    child = subprocess.Popen(
        [*MIGRATE, "receive", *DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert child.stderr is not None
    line = child.stderr.readline()
    assert "listening on" in line, line + child.stderr.read()
    return child


def run_sender(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MIGRATE, "send", *DEMO, *args], capture_output=True, text=True, timeout=120
    )


def test_cli_send_and_receive_over_mutual_tls(certs: Certificates) -> None:
    where = f"tcp:127.0.0.1:{free_port()}"
    receiver = start_receiver("--listen", where, *tls_flags(certs.server, certs.ca))
    try:
        sent = run_sender("--to", where, *tls_flags(certs.client, certs.ca))
        out, err = receiver.communicate(timeout=120)
    finally:
        receiver.kill()
    assert sent.returncode == 0, sent.stderr
    assert receiver.returncode == 0, err
    (sent_digest,) = [w for w in sent.stdout.split() if len(w) == 64]
    assert f"received; digest {sent_digest}" in out


def test_cli_with_the_wrong_ca_fails_on_both_sides(certs: Certificates) -> None:
    where = f"tcp:127.0.0.1:{free_port()}"
    receiver = start_receiver("--listen", where, *tls_flags(certs.server, certs.ca))
    try:
        sent = run_sender("--to", where, *tls_flags(certs.other_client, certs.ca))
        _, err = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
    assert sent.returncode == 1
    assert sent.stderr.splitlines()[-1] == (
        f"guestmem: {where}: TLS handshake failed: the peer does not trust this side's "
        "certificate (tlsv1 alert unknown ca)"
    )
    assert receiver.returncode == 1
    last = err.splitlines()[-1]
    assert last.startswith(f"guestmem: {where}: TLS handshake with 127.0.0.1:")
    assert last.endswith(
        "failed: the peer's certificate was refused: unable to get local issuer certificate "
        "(it does not chain to the CA given)"
    )


def test_cli_tls_flags_go_together(certs: Certificates, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["migrate", "send", "--to", "127.0.0.1:1", "--tls-cert", str(certs.client.cert)])
    assert exited.value.code == 2
    assert "--tls-cert, --tls-key and --tls-ca go together" in capsys.readouterr().err


def test_cli_a_missing_certificate_is_one_line_naming_it(
    certs: Certificates, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone.pem"
    flags = ["--tls-cert", str(missing), "--tls-key", str(certs.client.key)]
    flags += ["--tls-ca", str(certs.ca)]
    for verb, where in (("send", "--to"), ("receive", "--listen")):
        assert cli_main(["migrate", verb, where, "127.0.0.1:1", *flags]) == 1
        assert capsys.readouterr().err == (
            f"guestmem: TLS certificate {missing}: No such file or directory\n"
        )


def test_cli_plain_tcp_off_loopback_needs_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    forbid_connects(monkeypatch)
    assert cli_main(["migrate", "send", "--to", "192.0.2.1:4444", *DEMO]) == 1
    err = capsys.readouterr().err
    assert err.startswith("guestmem: tcp:192.0.2.1:4444: plain tcp off this host")
    assert "--allow-insecure" in err and len(err.splitlines()) == 1


def test_cli_plain_tcp_off_loopback_with_the_flag_warns_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable(*args: object, **kwargs: object) -> socket.socket:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    argv = ["migrate", "send", "--to", "192.0.2.1:4444", "--allow-insecure", *DEMO]
    assert cli_main(argv) == 1  # warned, then tried (and refused, here)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("guestmem: WARNING: tcp:192.0.2.1:4444: plain tcp")
    assert err[-1] == "guestmem: tcp:192.0.2.1:4444: cannot connect: Connection refused"
