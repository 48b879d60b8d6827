"""Certificates made at run time with the ``openssl`` command line, for the TLS tests.

Two unrelated CAs: ``ca`` signs a server certificate (SAN IP:127.0.0.1,
DNS:localhost, extendedKeyUsage serverAuth) and a client certificate
(clientAuth); ``other_ca`` signs a client certificate and a server
certificate of its own, so a peer from the wrong CA can be tried from both
sides. Keys are EC P-256: quick to make.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")

CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    """Everything the TLS tests need, in one directory."""

    ca: Path
    server: Pair
    client: Pair
    other_ca: Path
    other_client: Pair
    other_server: Pair


def _openssl(*args: str | Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    return path


def _ca(where: Path, name: str) -> Pair:
    key = _key(where / f"{name}.key")
    cert = where / f"{name}.pem"
    _openssl(
        "req", "-new", "-x509", "-key", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-extensions", "v3_ca_test", "-config", _config(where, "v3_ca_test", CA_EXTENSIONS),
    )  # fmt: skip
    return Pair(cert, key)


def _config(where: Path, section: str, extensions: str) -> Path:
    path = where / f"{section}.cnf"
    path.write_text(f"[req]\ndistinguished_name = dn\n[dn]\n[{section}]\n{extensions}")
    return path


def _leaf(where: Path, name: str, ca: Pair, usage: str) -> Pair:
    key = _key(where / f"{name}.key")
    request = where / f"{name}.csr"
    cert = where / f"{name}.pem"
    _openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN={name}")
    extensions = where / f"{name}.ext"
    extensions.write_text(LEAF_EXTENSIONS.format(usage=usage))
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return Pair(cert, key)


def make_certificates(where: Path) -> Certificates:
    """Make both CAs and their certificates under ``where``."""
    ca = _ca(where, "ca")
    other = _ca(where, "other-ca")
    return Certificates(
        ca=ca.cert,
        server=_leaf(where, "server", ca, "serverAuth"),
        client=_leaf(where, "client", ca, "clientAuth"),
        other_ca=other.cert,
        other_client=_leaf(where, "other-client", other, "clientAuth"),
        other_server=_leaf(where, "other-server", other, "serverAuth"),
    )
