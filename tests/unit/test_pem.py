"""PEM and file-format handling (defender_setup.pem) as the certificate checks meet it: DER,
PKCS#12, UTF-16, swapped, combined, truncated or damaged files, unexpected blocks; every
error names the file and never echoes its content."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defender_setup import pem
from defender_setup.certificates import CERT, KEY, check, describe
from defender_setup.errors import ValidationError
from tests import certfactory as f

from .test_certificates import NOW, fails


@pytest.fixture(scope="module")
def dev():
    return f.make_identity("dev1", key="rsa2048", now=NOW)


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
            pem.classify(zeros, KEY)
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


# --- the same certificate twice ----------------------------------------------------------------


def test_a_block_given_twice_is_found_whatever_its_formatting(dev):
    ca = f.make_ca("Copy CA", now=NOW)
    assert pem.first_copy(pem.classify(f.chain_pem(dev, ca), CERT)) is None
    assert pem.first_copy(pem.classify(f.chain_pem(dev, ca, ca), CERT)) == (3, 2)
    # the same DER in other line lengths is still the same certificate
    squashed = f.chain_pem(dev).replace(b"\n", b"") + b"\n"
    assert pem.first_copy(pem.classify(f.chain_pem(dev, ca) + squashed, CERT)) == (3, 1)
