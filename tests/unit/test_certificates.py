"""Tests for defender_setup.certificates: every rule and every error, and what is printed."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    assert "\n" not in message and message.startswith(field + ": ")
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


# --- file format errors ----------------------------------------------------------------------


@pytest.mark.parametrize("traditional", [False, True])
def test_encrypted_key_says_how_to_decrypt(dev, traditional):
    pem = f.encrypted_pem(dev.key, traditional=traditional)
    assert (b"Proc-Type: 4,ENCRYPTED" in pem) == traditional
    message = fails(KEY, dev.cert_pem, pem)
    assert "encrypted" in message and "cannot prompt" in message
    assert "openssl pkey -in key.pem -out key-plain.pem" in message


def test_der_certificate(dev):
    message = fails(CERT, f.der(dev), dev.key_pem)
    assert "DER" in message and "openssl x509 -inform der -in cert.der -out cert.pem" in message


def test_der_key(dev):
    message = fails(KEY, dev.cert_pem, f.der(dev.key))
    assert "DER" in message and "openssl pkey -inform der" in message


def test_der_encrypted_key():
    key = f.private_key("p256")
    blob = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"pw"))
    ident = f.make_identity("dev1", key=key, now=NOW)
    assert "openssl pkey -inform der" in fails(KEY, ident.cert_pem, blob)


def test_der_files_swapped(dev):
    assert "swapped" in fails(CERT, f.der(dev.key), dev.key_pem)
    assert "swapped" in fails(KEY, dev.cert_pem, f.der(dev))


def test_pkcs12_bundle(dev):
    blob = pkcs12.serialize_key_and_certificates(b"dev1", dev.key, dev.cert, None,
                                                 serialization.NoEncryption())
    assert "openssl pkcs12" in fails(CERT, blob, dev.key_pem)
    assert "openssl pkcs12" in fails(KEY, dev.cert_pem, blob)


def test_utf16_file(dev):
    assert "UTF-16" in fails(CERT, dev.cert_pem.decode().encode("utf-16"), dev.key_pem)


def test_binary_garbage_and_plain_text(dev):
    assert "binary" in fails(CERT, bytes(range(256)) * 4, dev.key_pem)
    assert "no PEM block" in fails(CERT, b"ssh-rsa AAAAB3NzaC1yc2E user@host\n", dev.key_pem)


def test_swapped_files(dev):
    message = fails(CERT, dev.key_pem, dev.cert_pem)
    assert "private key, not a certificate" in message and "swapped" in message


def test_key_file_holding_a_certificate(dev):
    assert "certificate, not a private key" in fails(KEY, dev.cert_pem, dev.cert_pem)


def test_both_in_one_file(dev):
    both = dev.cert_pem + dev.key_pem
    message = fails(CERT, both, dev.key_pem)
    assert "both" in message and "split" in message
    message = fails(KEY, dev.cert_pem, both)
    assert "both" in message and "split" in message


@pytest.mark.parametrize("content", [b"", b"  \n\r\n", b"\xef\xbb\xbf\n"])
def test_empty_files(dev, content):
    assert "empty" in fails(CERT, content, dev.key_pem)
    assert "empty" in fails(KEY, dev.cert_pem, content)


def test_truncated_without_end_line(dev):
    cut = dev.cert_pem[: len(dev.cert_pem) // 2]
    assert "no END line" in fails(CERT, cut, dev.key_pem)
    cut = dev.key_pem[: len(dev.key_pem) // 2]
    assert "no END line" in fails(KEY, dev.cert_pem, cut)


def test_bad_base64(dev):
    lines = dev.cert_pem.splitlines(keepends=True)
    lines[3] = b"*" + lines[3][1:]
    assert "not valid base64" in fails(CERT, b"".join(lines), dev.key_pem)
    lines = dev.key_pem.splitlines(keepends=True)
    lines[3] = lines[3][:-2] + b"\n"  # one character lost: 4k+1 characters cannot decode
    assert "not valid base64" in fails(KEY, dev.cert_pem, b"".join(lines))


def test_lines_missing_in_the_middle(dev):
    lines = dev.cert_pem.splitlines(keepends=True)
    message = fails(CERT, b"".join(lines[:3] + lines[6:]), dev.key_pem)
    assert "not a valid X.509 certificate" in message
    lines = dev.key_pem.splitlines(keepends=True)
    message = fails(KEY, dev.cert_pem, b"".join(lines[:3] + lines[6:]))
    assert "cannot be parsed" in message


def test_broken_markers(dev):
    assert "no BEGIN line" in fails(CERT, dev.cert_pem[12:], dev.key_pem)
    broken = dev.cert_pem.replace(b"-----BEGIN CERTIFICATE-----", b"-----BEGIN CERTIFICATE")
    assert "no BEGIN line" in fails(CERT, broken, dev.key_pem)
    assert "no complete PEM block" in fails(CERT, b"-----BEGIN \n", dev.key_pem)


def test_mismatched_end_label(dev):
    bad = dev.cert_pem.replace(b"END CERTIFICATE", b"END PRIVATE KEY")
    assert "no matching END" in fails(CERT, bad, dev.key_pem)


def test_trailing_garbage(dev):
    assert "after the last" in fails(CERT, dev.cert_pem + b"garbage\n", dev.key_pem)
    assert "after the last" in fails(KEY, dev.cert_pem, dev.key_pem + b"Zm9v")


def test_pem_squashed_onto_one_line_is_tolerated(dev):
    one_line = b" ".join(dev.cert_pem.split(b"\n"))
    assert check(one_line, dev.key_pem, now=NOW).common_name == "dev1"


def test_ec_parameters_block_before_the_key_is_tolerated():
    ident = f.make_identity("dev1", key="p384", now=NOW)
    params = b"-----BEGIN EC PARAMETERS-----\nBgUrgQQAIg==\n-----END EC PARAMETERS-----\n"
    assert check(ident.cert_pem, params + f.key_pem(ident.key, traditional=True),
                 now=NOW).key_description == "EC P-384"


def test_unexpected_blocks(dev):
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev1")]))
           .sign(dev.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert "signing request" in fails(CERT, csr, dev.key_pem)
    public = dev.key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "public key is not enough" in fails(KEY, dev.cert_pem, public)


def test_unknown_labels_are_not_echoed(dev):
    token = "TKOXREBXRJK6V8BC2AFKRG"  # a label is file content: it may be anything
    block = f.pem_block(token, b"\x30\x00")
    unknown = "(an unknown label of 22 characters)"
    for bad, said in ((block, f"unexpected PEM block {unknown[1:-1]}"),
                      (block.replace(f"END {token}".encode(), b"END X"), unknown),
                      (block.split(b"-----END")[0], unknown),
                      (f.pem_block(token, b"").replace(b"\n-----END", b"=\n-----END"), unknown),
                      (b"-----END " + token.encode() + b"-----\n", "an -----END ...----- line")):
        message = fails(CERT, bad, dev.key_pem)
        assert said in message and token[:8] not in message, message


def test_der_sniffing_of_a_large_file_takes_no_memory():
    import tracemalloc

    zeros = b"\0" * (1 << 20)  # an empty DER element every two bytes, half a million of them
    tracemalloc.start()
    try:
        with pytest.raises(ValidationError, match="binary"):
            certificates.classify(zeros, KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"{peak} bytes to look at {len(zeros)} bytes of zeros"


def test_certificate_text_is_printed_with_control_characters_escaped():
    cn = "dev1\x1b[2J\nforged: line\u202e"
    ident = f.make_identity(cn, key="p256", now=NOW)
    info = check(ident.cert_pem, ident.key_pem, device_id="dev1", now=NOW)
    lines = describe(info) + list(info.warnings)
    for text in lines + [info.subject, info.issuer, info.common_name]:
        assert "\x1b" not in text and "\n" not in text and "\u202e" not in text, text
    assert "CN=dev1\\x1b[2J\\nforged: line\\u202e" in info.subject
    assert "CN is 'dev1\\x1b[2J\\nforged: line\\u202e'" in info.warnings[0]


def test_two_keys_in_the_key_file(dev):
    two = dev.key_pem + f.key_pem(f.private_key("p256"))
    assert "2 private keys" in fails(KEY, dev.cert_pem, two)


def test_str_input_is_accepted(dev):
    assert check(dev.cert_pem.decode(), dev.key_pem.decode(), now=NOW).chain_length == 1


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


# --- property: damaged files never crash and never echo the key ------------------------------

_DEV = f.make_identity("dev1", key="p256", now=NOW)
_RSA = f.make_identity("dev1", key="rsa2048", now=NOW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from([_DEV, _RSA]), data=st.data())
def test_mangled_files_raise_validation_errors_without_key_material(which, data):
    """Cut, flip or splice the files anywhere: only ValidationError, and no key text in it."""
    def mangle(pem: bytes) -> bytes:
        i = data.draw(st.integers(0, len(pem)))
        j = data.draw(st.integers(i, len(pem)))
        insert = data.draw(st.binary(max_size=8))
        return pem[:i] + insert + pem[j:]

    cert, key = which.cert_pem, which.key_pem
    target = data.draw(st.sampled_from(["cert", "key", "both"]))
    bad_cert = mangle(cert) if target in ("cert", "both") else cert
    bad_key = mangle(key) if target in ("key", "both") else key
    try:
        check(bad_cert, bad_key, now=NOW)
    except ValidationError as exc:
        message = str(exc)
        assert "\n" not in message and exc.field in (CERT, KEY)
        for line in f.body(key):
            assert line[:16] not in message
