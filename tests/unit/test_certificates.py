"""Tests for defender_setup.certificates: every rule and every error, and what is printed."""

from __future__ import annotations

import datetime as dt

import pytest

from defender_setup import certificates
from defender_setup.certificates import CERT, KEY, check, describe
from defender_setup.errors import ValidationError
from tests import certfactory as f

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def dev():
    return f.make_identity("dev1", key="rsa2048", now=NOW)


@pytest.fixture(scope="module")
def pki():
    """Root -> intermediate -> leaf, all EC P-256 / RSA."""
    root = f.make_ca("Test Root CA", key=f.private_key("p256", 1), now=NOW)
    inter = f.make_ca("Test Intermediate CA", key=f.private_key("p256", 2), issuer=root,
                      now=NOW)
    leaf = f.make_identity("dev1", key="p256", issuer=inter, now=NOW)
    return root, inter, leaf


def fails(field, cert_pem, key_pem, **kw) -> str:
    """Run check; assert a ValidationError on ``field``."""
    with pytest.raises(ValidationError) as caught:
        check(cert_pem, key_pem, now=kw.pop("now", NOW), **kw)
    exc = caught.value
    assert exc.field == field, str(exc)
    message = str(exc)
    assert "\n" not in message and message.startswith(f"{field}: ")
    for pem in (cert_pem, key_pem or b""):  # never echo file contents
        if isinstance(pem, bytes) and b"-----BEGIN" in pem:
            for line in f.body(pem):
                assert line[:24] not in message
    return message


# --- what a good identity reports ------------------------------------------------------------


@pytest.mark.parametrize("kind,label", [("p256", "EC P-256"), ("p384", "EC P-384"),
                                        ("rsa3072", "RSA 3072 bits")])
@pytest.mark.parametrize("traditional", [False, True])
def test_supported_keys_pkcs8_and_traditional(kind, label, traditional):
    ident = f.make_identity("dev1", key=kind, now=NOW)
    pem = f.key_pem(ident.key, traditional=traditional)
    assert (b"BEGIN PRIVATE KEY" in pem) != traditional
    assert check(ident.cert_pem, pem, now=NOW).key_description == label


def test_describe_lines(pki):
    root, inter, leaf = pki
    info = check(leaf.fullchain_pem, leaf.key_pem, now=NOW)
    text = "\n".join(describe(info))
    for part in ("subject:", "CN=dev1", "issuer:", "CN=Test Intermediate CA", "valid:",
                 info.sha1_thumbprint, info.sha256_thumbprint, "EC P-256", "3 certificates"):
        assert part in text
    assert "self-signed" not in text


def test_naive_now_is_utc(dev):
    assert check(dev.cert_pem, dev.key_pem, now=NOW.replace(tzinfo=None)).chain_length == 1


def test_default_now_is_the_clock():
    ident = f.make_identity("dev1", key="p256")
    assert check(ident.cert_pem, ident.key_pem).warnings == ()


# --- key type and size -----------------------------------------------------------------------


@pytest.mark.parametrize("kind,words", [("rsa1024", "1024 bits"), ("p521", "secp521r1"),
                                        ("secp256k1", "secp256k1"), ("ed25519", "Ed25519")])
def test_unsupported_keys_are_refused(kind, words):
    ident = f.make_identity("dev1", key=kind, now=NOW)
    message = fails(KEY, ident.cert_pem, ident.key_pem)
    assert words in message and "2048" in message and "P-256" in message


def test_key_must_match_leaf(dev):
    other = f.private_key("rsa2048", 7)
    message = fails(KEY, dev.cert_pem, f.key_pem(other))
    assert "does not belong to the certificate" in message


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    head = bytes([size]) if size < 128 else bytes([0x80 | 2]) + size.to_bytes(2, "big")
    return bytes([tag]) + head + content


def test_damaged_rsa_key_is_refused(dev):
    nums = dev.key.private_numbers()
    values = [0, nums.public_numbers.n, nums.public_numbers.e, nums.d + 2, nums.p, nums.q,
              nums.dmp1, nums.dmq1, nums.iqmp]
    body = b"".join(_der(2, v.to_bytes(v.bit_length() // 8 + 1, "big")) for v in values)
    pem = f.pem_block("RSA PRIVATE KEY", _der(0x30, body))
    assert "damaged" in fails(KEY, dev.cert_pem, pem)


def test_key_matching_an_issuer_not_the_leaf_is_refused(pki):
    root, inter, leaf = pki
    assert "does not belong" in fails(KEY, leaf.fullchain_pem, inter.key_pem)


# --- chains ----------------------------------------------------------------------------------


def test_chain_leaf_first_is_accepted(pki):
    root, inter, leaf = pki
    info = check(leaf.fullchain_pem, leaf.key_pem, now=NOW)
    assert info.chain_length == 3 and not info.self_signed and info.warnings == ()
    assert info.common_name == "dev1"


def test_chain_with_issuer_first_is_an_error(pki):
    root, inter, leaf = pki
    # reported before the key would "not belong" to the first certificate
    message = fails(CERT, f.chain_pem(inter, leaf, root), leaf.key_pem)
    assert "wrong order" in message and "leaf" in message and "first" in message


def test_wrong_order_reported_before_validity():
    root = f.make_ca("Root", key=f.private_key("p256", 3), now=NOW)
    leaf = f.make_identity("dev1", key=f.private_key("p256", 3), issuer=root, now=NOW)
    # the leaf shares the CA's key, so only the order is wrong
    assert "wrong order" in fails(CERT, f.chain_pem(root, leaf), leaf.key_pem)


def test_chain_with_a_gap_is_a_warning(pki):
    root, inter, leaf = pki
    info = check(f.chain_pem(leaf, root), leaf.key_pem, now=NOW)
    assert info.warnings == ("certificate 2 (CN=Test Root CA) did not issue certificate 1; "
                             "order the chain leaf first, then each issuer",)


def test_expired_intermediate_is_a_warning(pki):
    root, _, _ = pki
    old = f.make_ca("Old Intermediate", key=f.private_key("p256", 4), issuer=root, now=NOW,
                    days=-2)
    leaf = f.make_identity("dev1", key="p256", issuer=old, now=NOW)
    info = check(leaf.fullchain_pem, leaf.key_pem, now=NOW)
    assert info.warnings == ("certificate 2 of the chain (CN=Old Intermediate) expired "
                             "2026-05-30 12:00:00 UTC",)


# --- validity --------------------------------------------------------------------------------


def test_expired_is_an_error():
    ident = f.make_identity("dev1", key="p256", days=-3, now=NOW)
    message = fails(CERT, ident.cert_pem, ident.key_pem)
    assert "expired" in message and "2026-05-29" in message and "2026-06-01 12:00:00" in message


def test_not_yet_valid_mentions_the_clock_and_the_time():
    ident = f.make_identity("dev1", key="p256", not_before=NOW + dt.timedelta(days=10),
                            now=NOW)
    message = fails(CERT, ident.cert_pem, ident.key_pem)
    assert "not valid yet" in message and "clock" in message
    assert "2026-06-01 12:00:00 UTC" in message and "2026-06-11" in message


def test_expiring_within_30_days_is_a_warning():
    ident = f.make_identity("dev1", key="p256", days=10, now=NOW)
    info = check(ident.cert_pem, ident.key_pem, now=NOW)
    assert info.warnings == ("the certificate expires in 10 days (2026-06-11 12:00:00 UTC); "
                             "renew it soon",)
    later = f.make_identity("dev1", key="p256", days=31, now=NOW)
    assert check(later.cert_pem, later.key_pem, now=NOW).warnings == ()


@pytest.mark.filterwarnings("ignore:SHA1 signatures are deprecated")
def test_sha1_signature_is_a_warning():
    try:
        ident = f.make_identity("dev1", key="p256", hash="sha1", now=NOW)
    except Exception as exc:  # a later cryptography may refuse to sign with SHA-1 at all
        pytest.skip(f"cannot make a SHA-1 certificate here: {exc}")
    info = check(ident.cert_pem, ident.key_pem, now=NOW)
    assert info.warnings == ("the certificate is signed with SHA1, which TLS libraries "
                             "increasingly refuse; reissue it with SHA-256",)


# --- common name -----------------------------------------------------------------------------


@pytest.mark.parametrize("cn", ["dev1", "dev1/DefenderIotMicroAgent"])
def test_cn_device_or_device_slash_module_is_fine(cn):
    ident = f.make_identity(cn, key="p256", now=NOW)
    info = check(ident.cert_pem, ident.key_pem, device_id="dev1",
                 module_id="DefenderIotMicroAgent", now=NOW)
    assert info.warnings == ()


def test_other_cn_is_a_warning_only_with_a_device_id():
    ident = f.make_identity("sensor-7", key="p256", now=NOW)
    assert check(ident.cert_pem, ident.key_pem, now=NOW).warnings == ()
    info = check(ident.cert_pem, ident.key_pem, device_id="dev1", module_id="M", now=NOW)
    (warning,) = info.warnings
    assert "'sensor-7'" in warning and "'dev1'" in warning and "'dev1/M'" in warning
    assert "CA-signed" in warning


def test_cn_differing_in_case_gets_a_pointed_warning():
    ident = f.make_identity("DEV1", key="p256", now=NOW)
    (warning,) = check(ident.cert_pem, ident.key_pem, device_id="dev1", now=NOW).warnings
    assert "case-sensitive" in warning


# --- secrets ---------------------------------------------------------------------------------


def test_no_key_material_in_any_key_error(dev):
    """Every key-file failure mode, with the key's base64 body searched for in the message."""
    key = dev.key_pem
    lines = key.splitlines(keepends=True)
    broken = [
        key + b"trailing\n",
        key[: len(key) // 2],
        b"".join(lines[:3] + lines[6:]),
        b"".join(lines[:-1]),
        dev.cert_pem + key,
        key + key,
        key.replace(b"PRIVATE KEY", b"SECRET THING"),
        f.key_pem(f.private_key("rsa2048", 9)),
    ]
    for bad in broken:
        with pytest.raises(ValidationError) as caught:
            check(dev.cert_pem, bad, now=NOW)
        message = str(caught.value)
        for line in f.body(key) + f.body(bad):
            assert line[:16] not in message, message
    with pytest.raises(ValidationError) as caught:  # key pasted as the certificate
        check(key, key, now=NOW)
    assert all(line[:16] not in str(caught.value) for line in f.body(key))


# --- normalisation and lazy import -----------------------------------------------------------


def test_normalize_drops_bom_crlf_and_surrounding_text(dev):
    messy = b"\xef\xbb\xbfBag Attributes\r\n" + dev.cert_pem.replace(b"\n", b"\r\n") + b"\r\n"
    clean = certificates.normalize_certificate(messy)
    assert clean.startswith(b"-----BEGIN CERTIFICATE-----\n") and b"\r" not in clean
    thumbprint = check(dev.cert_pem, dev.key_pem, now=NOW).sha256_thumbprint
    assert check(clean, dev.key_pem, now=NOW).sha256_thumbprint == thumbprint
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    ec_key = f.key_pem("p256", traditional=True)
    assert certificates.normalize_private_key(params + ec_key) == ec_key.replace(b"\r", b"")


# --- what systemd can hand the unit: sizes and copies -----------------------------------------


def test_a_certificate_given_twice_is_refused(pki):
    root, inter, leaf = pki
    message = fails(CERT, f.chain_pem(leaf, inter, inter), leaf.key_pem)
    assert message == ("certificate: certificate 3 is a copy of certificate 2; keep each "
                       "certificate once: the device (leaf) certificate first, then each issuer")
    assert "certificate 2 is a copy of certificate 1" in fails(CERT, f.chain_pem(leaf, leaf),
                                                               leaf.key_pem)


def test_a_one_mebibyte_chain_of_one_leaf_is_refused_for_its_size(dev):
    """What an attack pass fed the unit: 1 MiB of copies of the leaf, which systemd refused to
    hand the agent (243/CREDENTIALS) after validation had accepted it."""
    chain = dev.cert_pem * (1024 * 1024 // len(dev.cert_pem))
    message = fails(CERT, chain, dev.key_pem)
    assert message == (f"certificate: the file is {len(chain)} bytes; a certificate file is at "
                       "most 768 KiB (systemd hands the agent at most 1 MiB of credentials in "
                       "all; the chain needs only the leaf and its issuers, each once)")


def test_size_limits_are_inclusive_and_checked_before_parsing(dev):
    limit = 768 * 1024
    padded = b"#" * (limit - len(dev.cert_pem)) + dev.cert_pem  # text before a block is fine
    assert check(padded, dev.key_pem, now=NOW).chain_length == 1
    assert "at most 768 KiB" in fails(CERT, b"#" + padded, dev.key_pem)
    key = b"#" * (64 * 1024 - len(dev.key_pem)) + dev.key_pem
    assert check(dev.cert_pem, key, now=NOW).chain_length == 1
    assert fails(KEY, dev.cert_pem, b"#" + key) == (
        f"private key: the file is {len(key) + 1} bytes; a private key file is at most 64 KiB "
        "(systemd hands the agent at most 1 MiB of credentials in all; give the file that "
        "holds only the private key)")
