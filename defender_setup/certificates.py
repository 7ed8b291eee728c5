"""Check an X.509 identity (PEM certificate chain + PEM private key) before the agent uses it.

Interface (pure: bytes in, a result or a :class:`~defender_setup.errors.ValidationError` out):

- :func:`check` ``(cert_pem, key_pem, *, device_id=None, module_id=None, now=None)`` ->
  :class:`CertificateInfo`; raises ``ValidationError(field="certificate"|"private key", ...)``.
- :func:`validity` ``(cert_pem)`` -> the leaf's ``(not_before, not_after)``, judging nothing
  else (``check``'s expiry, for a stored certificate that may have expired since).
- :func:`describe` ``(info)`` -> human-readable lines (subject, issuer, validity, thumbprints, key).
- :func:`normalize_certificate` / :func:`normalize_private_key` ``(pem)`` -> clean PEM bytes
  (no BOM, LF line ends, no text around the blocks), the form to write for the agent: OpenSSL's
  PEM reader does not skip a BOM on the first line.

Messages are one line, name the fix, and never contain key material or file contents: they are
built from labels, counts, names and dates only. ``cryptography`` is imported lazily, inside
the functions that need it, so that commands which do not look at certificates start fast;
RSA private keys are matched in pure Python (see defender_setup.pem) because OpenSSL's RSA
key check alone would cost ~70 ms of a cold ``validate``. Works with cryptography 3.3
(Debian 11) to 43 (Debian 13).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass

from .errors import ValidationError, printable
from .inputs import check_size
from .pem import (
    CERT,
    KEY,
    UNPARSABLE_KEY,
    Block,
    classify,
    first_copy,
    rsa_private_numbers,
    rsa_public_numbers,
    shown_label,
)

EXPIRY_WARNING_DAYS = 30

_ENCRYPTED = ("the key is encrypted with a passphrase; the agent cannot prompt for it. "
              "Decrypt it with: openssl pkey -in key.pem -out key-plain.pem")
_SPLIT_HINT = (
    "split it: keep the CERTIFICATE blocks in the certificate file and put the PRIVATE KEY "
    "block in its own key file"
)
_KEY_ADVICE = "IoT Hub needs RSA of at least 2048 bits or EC P-256/P-384"
_CERT_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")
_KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")
_GOOD_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


@dataclass(frozen=True)
class CertificateInfo:
    """What was found in a certificate file (the leaf is the first certificate)."""

    subject: str  # subject, CN and issuer are printable(): control characters escaped
    common_name: str | None
    issuer: str
    not_before: _dt.datetime  # timezone-aware, UTC
    not_after: _dt.datetime
    sha1_thumbprint: str  # uppercase hex without colons, as the Azure portal asks for it
    sha256_thumbprint: str
    key_description: str  # e.g. "RSA 2048 bits", "EC P-256"
    chain_length: int
    warnings: tuple[str, ...] = ()
    self_signed: bool = False
    # the one of ``warnings`` about the leaf's end (check reports it as certificate-expiry)
    expiry_warning: str | None = None


# ---------------------------------------------------------------------------------------------
# Public functions


def check(cert_pem, key_pem, *, device_id=None, module_id=None, now=None) -> CertificateInfo:
    """Validate a certificate chain and its private key; return what was found.

    :param cert_pem: bytes (or str) of the certificate file, leaf first.
    :param key_pem: bytes (or str) of the unencrypted private key file.
    :param device_id: when given, a leaf CN that is neither it nor ``device_id/module_id`` warns.
    :param now: the current time (aware or naive UTC); defaults to the system clock.
    :raises ValidationError: field ``certificate`` or ``private key``.
    """
    for data, field in ((cert_pem, CERT), (key_pem, KEY)):  # first: it bounds the work below
        check_size(data, field)
    cert_blocks = classify(cert_pem, CERT)
    key_blocks = classify(key_pem, KEY)
    _check_roles(cert_blocks, key_blocks)
    copy = first_copy(cert_blocks)  # before parsing: a chain of copies is refused at once
    if copy:
        raise ValidationError(CERT, f"certificate {copy[0]} is a copy of certificate "
                              f"{copy[1]}; keep each certificate once: the device (leaf) "
                              "certificate first, then each issuer")
    certs = _load_certificates(cert_blocks)
    order = _order_error(certs)
    if order:  # before the key check, which would only say "does not belong"
        raise ValidationError(CERT, order)
    (key_block,) = [b for b in key_blocks if b.label in _KEY_LABELS]
    rsa_numbers = rsa_private_numbers(key_block)
    if rsa_numbers is not None:  # RSA: pure Python, OpenSSL's key check costs ~70 ms
        kind = ("RSA", rsa_numbers[0].bit_length())
    else:
        key = _load_private_key(key_block)
        kind = _key_kind(key.public_key())
    problem = _key_problem(*kind)
    if problem:
        raise ValidationError(KEY, problem)
    if rsa_numbers is not None:
        matches = rsa_numbers == rsa_public_numbers(cert_blocks[0].der)
    else:
        matches = _public_der(key.public_key()) == _public_der(_cert_key(certs[0]))
    if not matches:
        raise ValidationError(
            KEY,
            "the key does not belong to the certificate (its public key differs from the "
            "leaf certificate's); use the key that was generated with this certificate",
        )
    info, error = _analyse(cert_blocks, certs, device_id, module_id, _utcnow(now))
    if error:
        raise ValidationError(CERT, error)
    return info


def validity(cert_pem) -> tuple[_dt.datetime, _dt.datetime]:
    """The leaf certificate's ``(not_before, not_after)`` as aware UTC datetimes.

    Unlike :func:`check` it refuses nothing for dates: an expired certificate still has them.

    :raises ValidationError: field ``certificate``: too large, or not a PEM certificate.
    """
    check_size(cert_pem, CERT)
    blocks = [b for b in classify(cert_pem, CERT) if b.label in _CERT_LABELS]
    if not blocks:
        raise ValidationError(CERT, "holds no CERTIFICATE block")
    return _validity(_load_certificates(blocks[:1])[0])


def describe(info: CertificateInfo) -> list[str]:
    """Human-readable lines for the command line (no warnings: callers print those)."""
    issuer = info.issuer + (" (self-signed)" if info.self_signed else "")
    rows = [
        ("subject", info.subject),
        ("issuer", issuer),
        ("valid", f"{_fmt(info.not_before)} to {_fmt(info.not_after)}"),
        ("SHA-1 thumbprint", info.sha1_thumbprint),
        ("SHA-256 thumbprint", info.sha256_thumbprint),
        ("key", info.key_description),
    ]
    if info.chain_length > 1:
        rows.append(("chain", f"{info.chain_length} certificates, leaf first"))
    # Same column as credentials.Validated.summary_lines; long labels just take one space.
    return [f"{label}:".ljust(14) + " " + value for label, value in rows]


def normalize_certificate(cert_pem) -> bytes:
    """The certificate blocks of ``cert_pem`` as clean PEM (call after :func:`check`)."""
    return b"".join(b.pem() for b in classify(cert_pem, CERT) if b.label in _CERT_LABELS)


def normalize_private_key(key_pem) -> bytes:
    """The private key block of ``key_pem`` as clean PEM (call after :func:`check`)."""
    return b"".join(b.pem() for b in classify(key_pem, KEY) if b.label in _KEY_LABELS)


def _check_roles(cert_blocks: list[Block], key_blocks: list[Block]) -> None:
    """Catch swapped files, a combined file, encrypted keys and unexpected blocks."""
    certs = any(b.label in _CERT_LABELS for b in cert_blocks)
    cert_keys = any(_is_private_key(b) for b in cert_blocks)
    key_certs = any(b.label in _CERT_LABELS for b in key_blocks)
    if cert_keys and certs:
        raise ValidationError(CERT, "the file holds both the certificate and a private key; "
                              + _SPLIT_HINT)
    if cert_keys:
        raise ValidationError(CERT, "the file holds a private key, not a certificate; "
                              + ("the certificate and private key files are swapped; exchange them"
                                 if key_certs else "give the certificate file here"))
    for b in cert_blocks:
        if b.label not in _CERT_LABELS:
            raise ValidationError(CERT, _unexpected(b.label, CERT))
    keys = [b for b in key_blocks if _is_private_key(b)]
    if key_certs:
        raise ValidationError(KEY, ("the file holds both a certificate and the private key; "
                                    + _SPLIT_HINT) if keys else
                              "the file holds a certificate, not a private key; give the "
                              "private key file here (are the two files swapped?)")
    for b in key_blocks:
        if b.label == "ENCRYPTED PRIVATE KEY" or any(
            h.replace(" ", "").upper().startswith("PROC-TYPE:4,ENCRYPTED") for h in b.headers
        ):
            raise ValidationError(KEY, _ENCRYPTED)
        if b.label not in _KEY_LABELS and b.label != "EC PARAMETERS":  # ecparam -genkey adds it
            raise ValidationError(KEY, _unexpected(b.label, KEY))
    if len(keys) != 1:
        raise ValidationError(KEY, f"the file holds {len(keys)} private keys; keep only the "
                              "one that belongs to the certificate" if keys else
                              "the file holds no private key block")


def _is_private_key(block: Block) -> bool:
    return block.label.endswith("PRIVATE KEY")


def _unexpected(label: str, field: str) -> str:
    csr = ("a certificate signing request is not a certificate; have it signed and use the "
           "certificate you get back")
    hints = {
        "CERTIFICATE REQUEST": csr,
        "NEW CERTIFICATE REQUEST": csr,
        "PUBLIC KEY": "a public key is not enough; give the private key",
        "OPENSSH PRIVATE KEY": "OpenSSH keys are not supported; give a PEM key, "
        "e.g. convert it with: ssh-keygen -p -m PEM -f KEYFILE",
        "TRUSTED CERTIFICATE": "convert it to a plain certificate with: "
        "openssl x509 -in cert.pem -out cert-plain.pem",
    }
    expected = "CERTIFICATE" if field == CERT else "PRIVATE KEY"
    return f"unexpected PEM block {shown_label(label)} (expected {expected}); " + hints.get(
        label, f"give a PEM {field} file")


# ---------------------------------------------------------------------------------------------
# Parsing and checks (cryptography)


def _load_certificates(blocks: list[Block]) -> list:
    from cryptography import x509

    certs = []
    for n, block in enumerate(blocks, 1):
        try:
            certs.append(x509.load_pem_x509_certificate(block.pem()))
        except ValueError:
            raise ValidationError(CERT, f"certificate {n} is not a valid X.509 certificate; "
                                  "the file is corrupted, copy it again") from None
    return certs


def _load_private_key(block: Block):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(block.pem(), password=None)
    except TypeError:  # encrypted in a way the headers did not show
        raise ValidationError(KEY, _ENCRYPTED) from None
    except UnsupportedAlgorithm:
        raise ValidationError(KEY, f"the key type is not supported; {_KEY_ADVICE}") from None
    except ValueError:
        raise ValidationError(KEY, UNPARSABLE_KEY) from None


def _key_problem(kind: str, size) -> str | None:
    """Why IoT Hub would refuse this key type, or None if it is fine."""
    if kind == "RSA":
        return None if size >= 2048 else (
            f"an RSA key of {size} bits is too weak; {_KEY_ADVICE}")
    if kind == "EC":
        return None if size in _GOOD_CURVES else (
            f"EC curve {size} is not supported; {_KEY_ADVICE}")
    return f"{kind} keys are not supported; {_KEY_ADVICE}"


def _key_kind(public_key):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC", public_key.curve.name
    name = type(public_key).__name__.replace("PublicKey", "").lstrip("_")
    return (name or "this"), None


def _describe_key(kind: str, size) -> str:
    if kind == "RSA":
        return f"RSA {size} bits"
    if kind == "EC":
        return f"EC {_GOOD_CURVES.get(size, size)}"
    return kind


def _leaf_key_kind(blocks, certs):
    """(kind, size) of the leaf's public key; RSA without starting OpenSSL's backend."""
    numbers = rsa_public_numbers(blocks[0].der)
    if numbers is not None:
        return "RSA", numbers[0].bit_length()
    return _key_kind(_cert_key(certs[0]))


def _cert_key(cert):
    """The certificate's public key; the parser reads it only on demand, so it may fail here."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise ValidationError(CERT, "the certificate's public key cannot be read; the file "
                              "is corrupted or uses an unsupported key type") from None


def _public_der(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _order_error(certs) -> str | None:
    """The leaf must come first: certificate 1 must not be the issuer of a later one."""
    leaf = certs[0]
    for n, other in enumerate(certs[1:], 2):
        if other.issuer == leaf.subject and other.subject != leaf.subject:
            return (f"the certificates are in the wrong order: certificate 1 "
                    f"({_name(leaf.subject)}) issued certificate {n}; put the device (leaf) "
                    "certificate first, then each issuer")
    return None


def _analyse(blocks, certs, device_id, module_id, now):
    """Build the info; return it with the fatal validity error, or None. The order was
    judged before (:func:`check` raises it)."""
    error = None
    warnings: list[str] = []
    leaf = certs[0]
    for n in range(1, len(certs)):
        if certs[n - 1].issuer != certs[n].subject:
            warnings.append(f"certificate {n + 1} ({_name(certs[n].subject)}) did not issue "
                            f"certificate {n}; order the chain leaf first, then each issuer")
    not_before, not_after = _validity(leaf)
    expiring = None
    if now < not_before:
        error = (f"the certificate is not valid yet: it starts {_fmt(not_before)}, but the "
                 f"device clock says {_fmt(now)}; check the clock (timedatectl) or the "
                 "certificate's dates")
    elif now > not_after:
        error = (f"the certificate expired {_fmt(not_after)} (the device clock says "
                 f"{_fmt(now)}); issue a new certificate")
    elif not_after - now <= _dt.timedelta(days=EXPIRY_WARNING_DAYS):
        days = (not_after - now).days
        expiring = (f"the certificate expires in {days} day{'s' * (days != 1)} "
                    f"({_fmt(not_after)}); renew it soon")
        warnings.append(expiring)
    for n, other in enumerate(certs[1:], 2):
        if now > _validity(other)[1]:
            warnings.append(f"certificate {n} of the chain ({_name(other.subject)}) expired "
                            f"{_fmt(_validity(other)[1])}")
    algorithm = _hash_name(leaf)
    if algorithm in ("sha1", "md5"):
        warnings.append(f"the certificate is signed with {algorithm.upper()}, which TLS "
                        "libraries increasingly refuse; reissue it with SHA-256")
    cn = _common_name(leaf.subject)
    if device_id:
        expected = [device_id] + ([f"{device_id}/{module_id}"] if module_id else [])
        if cn not in expected:
            case = cn is not None and cn.lower() in [e.lower() for e in expected]
            warnings.append(
                f"the certificate's CN is '{printable(cn)}' but the identity is "
                f"{' or '.join(repr(e) for e in expected)}"
                + ("; IDs are case-sensitive" if case else "")
                + "; CA-signed identities need a matching CN (self-signed ones are matched "
                "by thumbprint)")
    info = CertificateInfo(
        subject=printable(leaf.subject.rfc4514_string()),
        common_name=None if cn is None else printable(cn),
        issuer=printable(leaf.issuer.rfc4514_string()),
        not_before=not_before,
        not_after=not_after,
        sha1_thumbprint=hashlib.sha1(blocks[0].der, usedforsecurity=False).hexdigest().upper(),
        sha256_thumbprint=hashlib.sha256(blocks[0].der).hexdigest().upper(),
        key_description=_describe_key(*_leaf_key_kind(blocks, certs)),
        chain_length=len(certs),
        warnings=tuple(warnings),
        self_signed=leaf.issuer == leaf.subject,
        expiry_warning=expiring,
    )
    return info, error


def _validity(cert):
    """(not_before, not_after) as aware UTC datetimes; ``*_utc`` exists from cryptography 42."""
    before = getattr(cert, "not_valid_before_utc", None)
    after = getattr(cert, "not_valid_after_utc", None)
    if before is None or after is None:
        before = cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)
        after = cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)
    return before, after


def _hash_name(cert) -> str | None:
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # UnsupportedAlgorithm on odd signatures; nothing to warn about then
        return None
    return algorithm.name if algorithm is not None else None


def _common_name(name) -> str | None:
    from cryptography.x509.oid import NameOID

    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def _name(name) -> str:
    cn = _common_name(name)
    return printable(f"CN={cn}" if cn is not None else (name.rfc4514_string() or "empty name"))


def _utcnow(now) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_dt.timezone.utc)
    return now if now.tzinfo else now.replace(tzinfo=_dt.timezone.utc)


def _fmt(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
