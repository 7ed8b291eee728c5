"""Certificates checked against openssl, and the cost of importing cryptography, in processes."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from defender_setup import certificates
from defender_setup.certificates import check
from tests import certfactory as f

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def dev():
    return f.make_identity("dev1", key="rsa2048", now=NOW)


def openssl_fingerprint(cert_pem: bytes, digest: str) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", f"-{digest}"],
                         input=cert_pem, capture_output=True, check=True).stdout.decode()
    return out.strip().split("=", 1)[1].replace(":", "").upper()


@pytest.mark.allow_subprocess("openssl")
def test_good_rsa_identity_reports_facts_and_openssl_thumbprints(dev):
    info = check(dev.cert_pem, dev.key_pem, device_id="dev1", now=NOW)
    assert info.subject == "CN=dev1" and info.common_name == "dev1"
    assert info.issuer == "CN=dev1" and info.self_signed
    assert info.key_description == "RSA 2048 bits"
    assert info.chain_length == 1 and info.warnings == ()
    assert info.not_before.tzinfo is not None and info.not_after > NOW
    assert info.sha1_thumbprint == openssl_fingerprint(dev.cert_pem, "sha1")
    assert info.sha256_thumbprint == openssl_fingerprint(dev.cert_pem, "sha256")
    assert len(info.sha1_thumbprint) == 40 and info.sha1_thumbprint.isupper()


@pytest.mark.allow_subprocess("openssl")
def test_whitespace_bom_crlf_and_leading_text_are_tolerated(dev):
    cert = b"\xef\xbb\xbf" + dev.cert_pem.replace(b"\n", b"\r\n") + b"\r\n  \n\t\n"
    key = b"\xef\xbb\xbf" + dev.key_pem.replace(b"\n", b"\r\n") + b"\n\n"
    info = check(cert, key, now=NOW)
    assert info.sha1_thumbprint == openssl_fingerprint(dev.cert_pem, "sha1")
    bag = b"Bag Attributes\n    localKeyID: 01 02\nsubject=CN = dev1\n"
    assert check(bag + dev.cert_pem, bag + dev.key_pem, now=NOW).chain_length == 1


@pytest.mark.allow_subprocess("python3")
def test_cryptography_is_imported_lazily():
    code = ("import sys, defender_setup.certificates; "
            "sys.exit('cryptography' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=certificates.__file__.rsplit(
        "/defender_setup/", 1)[0]).returncode == 0
