"""Test PKI for the hub: a CA, a server certificate with subjectAltName, client certificates.

Interface::

    pki = Pki(directory, seed=0)         # writes ca.pem, server.pem, server.key; another
                                         # seed gives an unrelated CA; ips= the server's
                                         # IP addresses (default 127.0.0.1)
    Pki(directory, server_days=(-10, -1))   # a server certificate that expired yesterday
    Pki(directory, cn=..., ca_cn=...)   # the server's and the CA's CN (default: names[0])
    pki.ca_file, pki.server_cert, pki.server_key
    pki.client("dev/mod") -> (cert_path, key_path)          # signed by the test CA
    pki.stranger("dev/mod") -> (cert_path, key_path)        # self-signed, unknown to the hub

Keys come from :mod:`tests.certfactory` (cached per process); files are 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import certfactory

SERVER_NAMES = ("localhost", "gateway.localhost", "testhub.azure-devices.net")


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


class Pki:
    def __init__(self, directory: Path, names=SERVER_NAMES, seed: int = 0,
                 ips=("127.0.0.1",), server_days: tuple[int, int] = (-1, 30),
                 cn: str | None = None, ca_cn: str | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key = certfactory.private_key("p256", 1000 * seed + 6)
        self.ca = certfactory.make_ca(ca_cn or f"Hubsim Test Root CA {seed}", key=ca_key)
        self.ca_file = _write(self.dir / "ca.pem", self.ca.cert_pem)
        key = certfactory.private_key("p256", 1000 * seed + 7)
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip))
                                                  for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or names[0])]))
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=server_days[0]))
            .not_valid_after(now + dt.timedelta(days=server_days[1]))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.ca.key, hashes.SHA256())
        )
        self.server_cert = _write(self.dir / "server.pem",
                                  cert.public_bytes(serialization.Encoding.PEM))
        self.server_key = _write(self.dir / "server.key", certfactory.key_pem(key))
        self._n, self.seed = 0, seed

    def client(self, cn: str, issuer=None):
        """A client certificate signed by the test CA (or ``issuer``)."""
        self._n += 1
        key = certfactory.private_key("p256", 1000 * self.seed + 10 + self._n)
        ident = certfactory.make_identity(cn, key=key, issuer=issuer or self.ca)
        return self._save(ident, f"client{self._n}")

    def stranger(self, cn: str):
        """A self-signed client certificate the hub does not know."""
        self._n += 1
        key = certfactory.private_key("p256", 1000 * self.seed + 10 + self._n)
        return self._save(certfactory.make_identity(cn, key=key), f"stranger{self._n}")

    def _save(self, ident, stem: str):
        cert = _write(self.dir / f"{stem}.pem", ident.cert_pem)
        key = _write(self.dir / f"{stem}.key", ident.key_pem)
        return cert, key
