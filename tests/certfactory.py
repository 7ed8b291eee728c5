"""Keys and certificates generated at test time (no secret is ever committed).

Interface (all pure; keys are cached per process because RSA generation is slow):

- ``private_key(kind="rsa2048", n=0)`` -> a key object; kinds: ``rsa2048``, ``rsa1024``,
  ``rsa3072``, ``p256``, ``p384``, ``p521``, ``secp256k1``, ``ed25519``. The same ``(kind, n)``
  returns the same key; use another ``n`` for a different key of the same kind.
- ``make_identity(cn="dev1", key="rsa2048", days=365, not_before=None, not_after=None,
  issuer=None, hash="sha256", now=None)`` -> :class:`Identity` (self-signed unless ``issuer``).
- ``make_ca(cn="Test Root CA", key="p256", days=3650, issuer=None, now=None)`` -> CA Identity.
- ``chain_pem(*certs_or_identities)`` -> concatenated PEM, in the order given.
- ``key_pem(key, traditional=False)`` -> unencrypted PEM (PKCS#8, or "BEGIN RSA/EC PRIVATE KEY").
- ``encrypted_pem(key, passphrase=b"test-pass", traditional=False)`` -> encrypted PEM
  (``ENCRYPTED PRIVATE KEY``, or traditional with ``Proc-Type: 4,ENCRYPTED``).
- ``der(cert_or_key)`` -> DER bytes (a key as PKCS#8).
- ``pem_block(label, der_bytes)`` -> a PEM block around any bytes (for damaged files).
- ``body(pem)`` -> the base64 text of a PEM's blocks, to assert it never shows up in messages.

``days`` counts from now: ``days=-1`` is expired yesterday, ``days=10`` expires in ten days;
``not_before`` in the future makes a certificate that is not valid yet.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

_CURVES = {"p256": ec.SECP256R1, "p384": ec.SECP384R1, "p521": ec.SECP521R1,
           "secp256k1": ec.SECP256K1}
_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha1": hashes.SHA1}


@dataclass(frozen=True)
class Identity:
    """A certificate and its key; ``issuers`` are the CA identities above it, nearest first."""

    cert: x509.Certificate
    key: object
    issuers: tuple = ()

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def fullchain_pem(self) -> bytes:
        """Leaf first, then each issuer (what a CA-signed device presents)."""
        return chain_pem(self, *self.issuers)


@functools.cache
def private_key(kind: str = "rsa2048", n: int = 0):
    """A cached private key of ``kind``; ``n`` tells apart several keys of one kind."""
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind]())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def _key(key):
    return private_key(key) if isinstance(key, str) else key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_identity(cn: str = "dev1", key="rsa2048", days: int = 365, not_before=None,
                  not_after=None, issuer: Identity | None = None, hash: str = "sha256",
                  now=None, ca: bool = False, serial: int | None = None) -> Identity:
    """A certificate for ``cn``; self-signed unless ``issuer`` (an Identity) is given."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    not_after = not_after or now + _dt.timedelta(days=days)
    not_before = not_before or min(now, not_after) - _dt.timedelta(days=1)
    key = _key(key)
    signer_key = issuer.key if issuer else key
    signer_name = issuer.cert.subject if issuer else _name(cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(_naive(not_before))
        .not_valid_after(_naive(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    algorithm = None if isinstance(signer_key, ed25519.Ed25519PrivateKey) else _HASHES[hash]()
    cert = builder.sign(signer_key, algorithm)
    issuers = ((issuer,) + issuer.issuers) if issuer else ()
    return Identity(cert, key, issuers)


def make_ca(cn: str = "Test Root CA", key="p256", days: int = 3650,
            issuer: Identity | None = None, now=None) -> Identity:
    """A CA certificate (root when ``issuer`` is None, else an intermediate)."""
    return make_identity(cn, key=key, days=days, issuer=issuer, now=now, ca=True)


def chain_pem(*items) -> bytes:
    """PEM of certificates (or Identities) in the order given."""
    certs = [i.cert if isinstance(i, Identity) else i for i in items]
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key, traditional: bool = False) -> bytes:
    """Unencrypted PEM: PKCS#8, or the traditional RSA/EC form."""
    fmt = (serialization.PrivateFormat.TraditionalOpenSSL if traditional
           else serialization.PrivateFormat.PKCS8)
    return _key(key).private_bytes(serialization.Encoding.PEM, fmt,
                                   serialization.NoEncryption())


def encrypted_pem(key, passphrase: bytes = b"test-pass", traditional: bool = False) -> bytes:
    """An encrypted PEM key: PKCS#8 ("ENCRYPTED PRIVATE KEY") or traditional (Proc-Type)."""
    fmt = (serialization.PrivateFormat.TraditionalOpenSSL if traditional
           else serialization.PrivateFormat.PKCS8)
    return _key(key).private_bytes(serialization.Encoding.PEM, fmt,
                                   serialization.BestAvailableEncryption(passphrase))


def der(item) -> bytes:
    """DER bytes of a certificate, an Identity's certificate, or a key (PKCS#8)."""
    if isinstance(item, Identity):
        item = item.cert
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.DER)
    return _key(item).private_bytes(serialization.Encoding.DER,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())


def pem_block(label: str, der_bytes: bytes) -> bytes:
    """Wrap DER bytes in a PEM block with ``label`` (to build odd or damaged files)."""
    text = base64.b64encode(der_bytes).decode("ascii")
    lines = "".join(text[i:i + 64] + "\n" for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}-----END {label}-----\n".encode("ascii")


def body(pem: bytes) -> list[str]:
    """The base64 lines inside PEM blocks (to check that no message echoes them)."""
    lines = pem.decode("ascii").splitlines()
    return [line for line in lines if line and not line.startswith("-----") and ":" not in line]


def _naive(moment: _dt.datetime) -> _dt.datetime:
    """cryptography < 42 wants naive UTC datetimes in the builder."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(_dt.timezone.utc).replace(tzinfo=None)
