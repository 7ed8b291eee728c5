"""PEM framing and the little DER reading that needs no cryptography (pure).

Interface::

    classify(data, field) -> list[Block]          # raises ValidationError(field, ...)
    Block(label, headers, der).pem()               # clean PEM: no BOM, LF, 64 columns
    rsa_private_numbers(block) -> (n, e) | None    # after checking the key's arithmetic
    rsa_public_numbers(cert_der) -> (n, e) | None
    first_copy(blocks) -> (n, m) | None            # block n (from 1) repeats block m

Split out of :mod:`certificates`, which keeps what is checked; this module is how files are
framed. Messages never contain file contents: labels, block numbers and hints only.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from dataclasses import dataclass

from .errors import CERTIFICATE as CERT
from .errors import PRIVATE_KEY as KEY
from .errors import ValidationError

MARKER = re.compile(r"-----(BEGIN|END) ([A-Z0-9 ]+)-----")
# Labels that messages may name; any other label is file content and is not echoed.
KNOWN_LABELS = frozenset((
    "CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE", "CERTIFICATE REQUEST",
    "NEW CERTIFICATE REQUEST", "X509 CRL", "PKCS7", "CMS", "PUBLIC KEY", "RSA PUBLIC KEY",
    "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "DSA PRIVATE KEY",
    "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY", "EC PARAMETERS", "DH PARAMETERS",
    "PGP PRIVATE KEY BLOCK", "PGP PUBLIC KEY BLOCK"))
# One message for a key that does not parse, here or through cryptography (certificates).
UNPARSABLE_KEY = ("the private key cannot be parsed; the file is corrupted or incomplete, "
                  "copy it again")


def shown_label(label: str) -> str:
    """The label as messages may show it: a known one, or only its length."""
    return label if label in KNOWN_LABELS else f"an unknown label of {len(label)} characters"


@dataclass(frozen=True)
class Block:
    """One PEM block: its label (``CERTIFICATE``...), headers and the decoded DER."""

    label: str
    headers: tuple[str, ...]
    der: bytes

    def pem(self) -> bytes:
        text = base64.b64encode(self.der).decode("ascii")
        body = "".join(text[i:i + 64] + "\n" for i in range(0, len(text), 64))  # as OpenSSL
        return f"-----BEGIN {self.label}-----\n{body}-----END {self.label}-----\n".encode("ascii")


# ---------------------------------------------------------------------------------------------
# PEM framing (no cryptography needed)


def classify(data, field: str) -> list[Block]:
    """Split ``data`` into PEM blocks; raise for empty, DER, truncated or trailing garbage."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise ValidationError(field, f"the file is empty; give the file that holds the PEM {field}")
    if b"-----BEGIN " not in data and b"-----END " not in data:
        raise ValidationError(field, _not_pem(data, field))
    # latin-1 maps every byte, so odd bytes end up as invalid base64 instead of a decode error.
    # Putting each marker on its own line also accepts a PEM squashed onto one line.
    text = MARKER.sub(lambda m: "\n" + m.group(0) + "\n", data.decode("latin-1"))
    blocks: list[Block] = []
    label = None
    headers: list[str] = []
    body: list[str] = []
    garbage = False
    for raw in text.splitlines():
        line = raw.strip()
        marker = MARKER.fullmatch(line)
        if label is None:
            if marker and marker.group(1) == "BEGIN":
                label, headers, body, garbage = marker.group(2), [], [], False
            elif marker:
                end = marker.group(2) if marker.group(2) in KNOWN_LABELS else "..."
                raise ValidationError(field, f"an -----END {end}----- line has no BEGIN line; "
                                      "the start of the file is missing, copy it again")
            elif line and blocks:
                garbage = True  # text between blocks is fine (openssl pkcs12 writes some)
            continue
        if marker is None:
            if ":" in line and not body:
                headers.append(line)  # RFC 1421 headers, e.g. Proc-Type: 4,ENCRYPTED
            elif line:
                body.append(line)
            continue
        n = len(blocks) + 1
        if marker.group(1) == "BEGIN" or marker.group(2) != label:
            raise ValidationError(field, f"PEM block {n} ({shown_label(label)}) has no matching "
                                  "END line; "
                                  "the file is truncated or two files were pasted together")
        blocks.append(Block(label, tuple(headers), _b64(body, field, n, label)))
        label = None
    if label is not None:
        raise ValidationError(field, f"PEM block {len(blocks) + 1} ({shown_label(label)}) has "
                              "no END line; the file is truncated, copy it again")
    if garbage:
        raise ValidationError(field, "there is text after the last -----END ...----- line; "
                              "remove everything after it")
    if not blocks:
        raise ValidationError(field, "the file holds no complete PEM block (expected a "
                              "-----BEGIN ...----- line); copy it again")
    return blocks


def first_copy(blocks: list[Block]):
    """``(n, m)``: block n holds the same DER as the earlier block m (numbered from 1); None
    when every block differs. However it is laid out, the same DER is the same thing."""
    seen: dict = {}
    for n, block in enumerate(blocks, 1):
        m = seen.setdefault(block.der, n)
        if m != n:
            return n, m
    return None


def _b64(body: list[str], field: str, n: int, label: str) -> bytes:
    joined = "".join("".join(line.split()) for line in body)
    try:
        der = base64.b64decode(joined, validate=True)
    except (binascii.Error, ValueError):
        der = b""
    if not der:
        raise ValidationError(field, f"PEM block {n} ({shown_label(label)}) is not valid "
                              "base64; the file is truncated or corrupted, copy it again")
    return der


def _not_pem(data: bytes, field: str) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Windows editors' "Unicode"
        return ("the file is UTF-16 text; save it as ASCII or UTF-8, e.g. with: "
                "iconv -f UTF-16 -t UTF-8 FILE > FILE.pem")
    kind = _der_kind(data)
    if kind == "pkcs12":
        return ("the file is a PKCS#12 bundle (.pfx/.p12), not PEM; extract PEM files with: "
                "openssl pkcs12 -in bundle.pfx -nokeys -out cert.pem, and "
                "openssl pkcs12 -in bundle.pfx -nocerts -nodes -out key.pem")
    if field == CERT and kind == "certificate":
        return ("the certificate is DER (binary), not PEM; convert it with: "
                "openssl x509 -inform der -in cert.der -out cert.pem")
    if field == KEY and kind in ("private key", "encrypted private key"):
        return ("the key is DER (binary), not PEM; convert it with: "
                "openssl pkey -inform der -in key.der -out key.pem")
    if kind is not None:
        other = "certificate" if field == KEY else "private key"
        return (f"the file holds a {kind} in DER (binary) form, not a {field}; are the "
                f"{other} and {field} files swapped?")
    if b"\0" in data or not _printable(data):
        return "the file is binary, not PEM text (expected -----BEGIN ...----- lines)"
    return "the file holds no PEM block (expected a -----BEGIN ...----- line)"


def _printable(data: bytes) -> bool:
    sample = data[:512]
    return sum(32 <= b < 127 or b in b"\t\r\n" for b in sample) >= 0.9 * len(sample)


def _der_kind(data: bytes) -> str | None:
    """Guess what a DER blob is from its first ASN.1 tags, without parsing all of it."""
    try:
        first = der_seq(data)[0]
        if first[0] == 0x02:  # INTEGER: PKCS#12 has version 3, a key version 0 or 1
            return "pkcs12" if data[first[1]:first[2]] == b"\x03" else "private key"
        inner = der_seq(data, first)[0]
    except (ValueError, IndexError):
        return None
    if inner[0] in (0xA0, 0x02):  # tbsCertificate starts with [0] version or the serial
        return "certificate"
    if inner[0] == 0x06:  # EncryptedPrivateKeyInfo starts with an AlgorithmIdentifier
        return "encrypted private key"
    return None


# ---------------------------------------------------------------------------------------------
# Minimal DER reading for RSA keys: loading one through cryptography runs OpenSSL's full key
# check (~70 ms, primality tests), and starting its backend costs ~15 ms more; comparing the
# modulus and checking the CRT parameters' arithmetic is enough to catch a wrong or damaged key.

_RSA_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption


def der_items(data: bytes, start: int = 0, end: int | None = None):
    """Yield the (tag, content start, content end) elements laid out in ``data[start:end]``.

    A generator: a caller that looks at the first elements reads only those, so a file of
    zeros (a million empty elements) costs no memory.
    """
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        if pos + 2 > end:
            raise ValueError("truncated DER")
        tag, length, pos = data[pos], data[pos + 1], pos + 2
        if length & 0x80:
            count = length & 0x7F
            if not 0 < count <= 4 or pos + count > end:
                raise ValueError("bad DER length")
            length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
        if pos + length > end:
            raise ValueError("truncated DER")
        yield tag, pos, pos + length
        pos += length


def der_first(data: bytes) -> tuple:
    for item in der_items(data):
        return item
    raise ValueError("no DER element")


def der_seq(data: bytes, item=None, limit: int = 16) -> list:
    """The first ``limit`` elements of a SEQUENCE (``item``, or the first element of data)."""
    tag, start, end = item or der_first(data)
    if tag != 0x30:
        raise ValueError("not a SEQUENCE")
    return list(itertools.islice(der_items(data, start, end), limit))


def der_ints(data: bytes, items) -> list[int]:
    if any(tag != 0x02 for tag, _, _ in items):
        raise ValueError("not an INTEGER")
    return [int.from_bytes(data[s:e], "big", signed=True) for _, s, e in items]


def _whole(der: bytes) -> tuple:
    """The first element, which must be all of ``der`` (no bytes after the key)."""
    item = der_first(der)
    if item[2] != len(der):
        raise ValueError("data after the DER element")
    return item


def rsa_private_numbers(block: Block):
    """(n, e) of an RSA private key, after checking its arithmetic; None if it is not RSA."""
    der = block.der
    try:
        if block.label == "PRIVATE KEY":  # PKCS#8: version, AlgorithmIdentifier, OCTET STRING
            items = der_seq(der, _whole(der))
            algorithm = der_seq(der, items[1])[0]
            if algorithm[0] != 0x06 or der[algorithm[1]:algorithm[2]] != _RSA_OID:
                return None
            if items[2][0] != 0x04:
                raise ValueError("no key OCTET STRING")
            der = der[items[2][1]:items[2][2]]
        elif block.label != "RSA PRIVATE KEY":
            return None
        fields = der_seq(der, _whole(der))
        if len(fields) != 9:  # two-prime PKCS#1; leave anything else to OpenSSL
            return None
        version, n, e, d, p, q, dp, dq, qinv = der_ints(der, fields)
    except (ValueError, IndexError):
        raise ValidationError(KEY, UNPARSABLE_KEY) from None
    consistent = (version == 0 and p > 1 and q > 1 and p * q == n
                  and (e * d - 1) % (p - 1) == 0 and (e * d - 1) % (q - 1) == 0
                  and dp == d % (p - 1) and dq == d % (q - 1) and (qinv * q) % p == 1)
    if not consistent:
        raise ValidationError(KEY, "the RSA key is damaged (its numbers do not fit together); "
                              "copy it again from the original")
    return n, e


def rsa_public_numbers(cert_der: bytes):
    """(n, e) of a certificate's RSA public key, or None if it is not RSA."""
    try:
        tbs = der_seq(cert_der, der_seq(cert_der)[0])
        spki = tbs[6] if tbs[0][0] == 0xA0 else tbs[5]  # [0] version is optional
        algorithm, bits = der_seq(cert_der, spki)[:2]
        oid = der_seq(cert_der, algorithm)[0]
        if oid[0] != 0x06 or cert_der[oid[1]:oid[2]] != _RSA_OID or bits[0] != 0x03:
            return None
        key = cert_der[bits[1] + 1:bits[2]]  # skip the BIT STRING's unused-bits byte
        n, e = der_ints(key, der_seq(key))
    except (ValueError, IndexError):
        return None  # cryptography parsed it, so let it describe the key
    return n, e
