"""defender_setup.importer: validate an offered set, write it once, verify it, go back if refused.

The pure part (check_offer) is tested with offers built in memory; run() works on a
throw-away root with real files and a fake systemctl first on PATH (tests/fakes.py)
and a fake clock, so the verdicts cost no time.
"""


import pytest

from defender_setup.errors import ValidationError
from defender_setup.importer import check_offer
from defender_setup.offer import Offer
from defender_setup.provision import NOTHING_STORED, Stored
from tests import certfactory
from tests.conftest import DEVICE
from tests.offers import CERT, CS, KEY, X509, key_of, offered, sas


@pytest.fixture(scope="module")
def ident():
    return certfactory.make_identity(cn=DEVICE, key="p256")


# -- check_offer: the pure part ----------------------------------------------------------
def stored_with(files: dict) -> Stored:
    """A stored set of plain files, as provision.read would see it."""
    from dataclasses import replace

    return replace(NOTHING_STORED, files=files, plain=files)


def test_sas_credential_is_the_connection_string_method():
    v = check_offer(offered(sas())).validated
    assert v.method == "connection-string" and set(v.files) == {CS}


def test_certificate_set(ident):
    v = check_offer(offered(X509, ident.cert_pem, ident.key_pem)).validated
    assert v.method == "certificate" and set(v.files) == {CS, CERT, KEY}


def test_a_new_certificate_alone_rekeys_a_certificate_device(ident):
    current = check_offer(offered(X509, ident.cert_pem, ident.key_pem)).validated.files
    current = {n: d for n, (d, _m) in current.items()}
    other = certfactory.make_identity(cn=DEVICE, key="p256")
    v = check_offer(offered(cert=other.cert_pem, key=other.key_pem),
                    stored_with(current)).validated
    assert v.files[CERT][0] != current[CERT] and v.files[CS][0] == current[CS]


def error_of(offer, current=None) -> str:
    with pytest.raises(ValidationError) as caught:
        check_offer(offer, stored_with(current or {}))
    return str(caught.value)


def test_bad_input_names_the_credential_the_field_and_the_fix(ident):
    encrypted = certfactory.encrypted_pem(certfactory.private_key("p256", 5))
    cases = {
        "empty": (offered(b""), "credential defender-setup.connection-string: is empty"),
        "garbage": (offered(b"\x00garbage;;"), "credential defender-setup.connection-string: "),
        "bad key": (offered(sas().replace(b"SharedAccessKey=", b"SharedAccessKey=%")),
                    "credential defender-setup.connection-string: SharedAccessKey: is not "
                    "valid base64"),
        "encrypted key": (offered(X509, ident.cert_pem, encrypted),
                          "credential defender-setup.private-key: "),
        "cert without key": (offered(X509, ident.cert_pem),
                             "credential defender-setup.private-key: is missing: a "
                             "certificate was given without its private key"),
        "key without cert": (offered(X509, key=ident.key_pem),
                             "credential defender-setup.certificate: is missing"),
        "x509 without files": (offered(X509), "credential defender-setup.certificate: is "
                               "missing: the connection string says x509=true"),
        "sas with a certificate": (offered(sas(), ident.cert_pem, ident.key_pem),
                                   "credential defender-setup.certificate: was given, but "
                                   "the connection string uses SharedAccessKey"),
        "certificate alone, SAS device": (offered(cert=ident.cert_pem, key=ident.key_pem),
                                          "credential defender-setup.connection-string: is "
                                          "missing"),
        "swapped": (offered(X509, ident.key_pem, ident.cert_pem),
                    "credential defender-setup.certificate: "),
    }
    for name, (offer, start) in cases.items():
        message = error_of(offer)
        assert message.startswith(start), (name, message)
        assert "\n" not in message, name
        assert "BEGIN" not in message and key_of(sas()) not in message, name
    assert "encrypted" in error_of(cases["encrypted key"][0])


def test_drop_folder_errors_name_the_file(tmp_path):
    offer = Offer("drop-folder", {CS: b"nonsense"}, {CS: str(tmp_path / CS)}, folder=tmp_path)
    assert error_of(offer).startswith(f"{tmp_path / CS}: part 1 (8 characters) has no '='")
