"""TLS for migration channels: one side's certificate, key and CA, checked before use.

TLS 1.3 only, with mutual authentication: the server requires a client
certificate, both sides verify the peer's against the CA, and the client
checks that the server's certificate names the host it dialled.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass

from guestmem.errors import UsageError

# A certificate or key file larger than this is not one.
_PEM_LIMIT = 1 << 20


@dataclass(frozen=True)
class TlsConfig:
    """One side's certificate and key, and the CA that the peer's certificate must chain to.

    All three are PEM files; the key has no passphrase. Each is read and
    checked when the config is made (a file missing, unreadable, not PEM, or
    a key that is not the certificate's: :class:`UsageError` naming the
    file) and read again for every connection, so renewed files are used.
    The server requires a client certificate; the client checks the server's
    and that it names the host dialled (a SAN such as ``IP:192.0.2.7`` or
    ``DNS:target.example``). A certificate with an extendedKeyUsage must
    list ``serverAuth`` to serve and ``clientAuth`` to connect.
    """

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        """Check every file now, before any connection."""
        _read_pem(self.cert, "certificate", rb"-----BEGIN CERTIFICATE-----")
        key = _read_pem(self.key, "key", rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
        if b"ENCRYPTED" in key:
            raise UsageError(f"TLS key {self.key}: has a passphrase; give an unencrypted key")
        _read_pem(self.ca, "CA certificate", rb"-----BEGIN CERTIFICATE-----")
        self.client_context()

    def client_context(self) -> ssl.SSLContext:
        """A TLS 1.3 context for the connecting side (verifies the server and its name)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        self._load(context)
        return context

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.3 context for the listening side (requires and verifies a client cert)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        self._load(context)
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as err:
            raise UsageError(f"TLS CA certificate {self.ca}: {reason(err)}") from None
        try:
            context.load_cert_chain(self.cert, self.key, password=lambda: _no_passphrase(self.key))
        except (ssl.SSLError, OSError) as err:
            raise UsageError(
                f"TLS certificate {self.cert} with key {self.key}: {reason(err)}"
            ) from None


def _read_pem(path: str, what: str, marker: bytes) -> bytes:
    """The bytes of ``path``, a regular file holding ``marker``; else UsageError naming it."""
    try:
        with open(path, "rb", opener=_open_no_block) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"TLS {what} {path}: not a regular file")
            data = f.read(_PEM_LIMIT + 1)
    except OSError as err:
        raise UsageError(f"TLS {what} {path}: {err.strerror or err}") from None
    if len(data) > _PEM_LIMIT or re.search(marker, data) is None:
        raise UsageError(f"TLS {what} {path}: not a PEM file with a {what}")
    return data


def _open_no_block(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)  # a FIFO would block an open


def _no_passphrase(key: str) -> bytes:
    raise UsageError(f"TLS key {key}: has a passphrase; give an unencrypted key")


def reason(err: OSError) -> str:
    """Plain words for why a socket or TLS call failed."""
    if isinstance(err, ssl.SSLCertVerificationError):
        # 18, 19, 20: self-signed, or an issuer the CA file does not hold
        hint = " (it does not chain to the CA given)" if err.verify_code in (18, 19, 20) else ""
        return f"the peer's certificate was refused: {err.verify_message}{hint}"
    reason = getattr(err, "reason", None)
    if isinstance(err, ssl.SSLError) and reason:
        plain = {
            "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this side's certificate",
            "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused this side's certificate",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
            "WRONG_VERSION_NUMBER": "the peer does not speak TLS",
            "KEY_VALUES_MISMATCH": "the key is not the certificate's",
        }.get(reason)
        detail = reason.lower().replace("_", " ")
        return f"{plain} ({detail})" if plain else detail
    if isinstance(err, TimeoutError):
        return "the peer went quiet"
    return err.strerror or str(err) or type(err).__name__
