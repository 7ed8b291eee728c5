"""defender_setup.dps: the enrollment validated (pure), the group key derivation, the DPS token."""

import base64
import time

import pytest

from defender_setup import dps
from defender_setup.errors import CERTIFICATE, PRIVATE_KEY, Field, ValidationError
from tests import certfactory
from tests.hubsim.hubrest import check_sas

GROUP_KEY = b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # bytes 0..31
# Computed apart from the code under test, with OpenSSL:
#   printf '%s' device-0001 | openssl dgst -sha256 -mac HMAC -macopt hexkey:0001..1f -binary \
#     | base64
DERIVED = b"OycyYByY1ii3rpTZvjHN0Jpe7PEs3qYqTaN5QaJZg2I="
KEY = base64.b64encode(b"k" * 32)
SCOPE = "0ne00000A0A"


@pytest.fixture
def machine(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    return tmp_path


def refused(field, **kw):
    kw.setdefault("root", "/nonexistent")
    with pytest.raises(ValidationError) as info:
        dps.enrollment(**kw)
    assert info.value.field == field, str(info.value)
    text = str(info.value)
    assert "\n" not in text
    for secret in (KEY.decode(), GROUP_KEY.decode()):
        assert secret not in text
    return text


def test_the_group_key_derivation_matches_an_independent_computation():
    assert dps.derive_device_key(GROUP_KEY, "device-0001") == DERIVED


def test_a_group_key_gives_the_derived_device_key_and_never_itself(machine):
    e = dps.enrollment(SCOPE, "device-0001", group_key=GROUP_KEY, root=machine)
    assert e.device_key == DERIVED and e.group_key
    assert GROUP_KEY.decode() not in repr(e) and DERIVED.decode() not in repr(e)


def test_the_registration_id_defaults_to_the_machine_id(machine):
    e = dps.enrollment(SCOPE, symmetric_key=KEY, root=machine)
    assert e.registration_id == "3d1219c7c4c5404aaa1f6d2a48adfda4"
    assert (e.endpoint, e.module_id, e.attestation) == (dps.GLOBAL_ENDPOINT, dps.DEFAULT_MODULE,
                                                        dps.SYMMETRIC_KEY)
    assert dps.address(e.endpoint) == (dps.GLOBAL_ENDPOINT, 443)


@pytest.mark.parametrize("content", ["", "uninitialized\n", None])
def test_an_unset_machine_id_names_the_option(tmp_path, content):
    if content is not None:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/machine-id").write_text(content)
    text = refused(Field.DPS_REGISTRATION_ID, id_scope=SCOPE, symmetric_key=KEY, root=tmp_path)
    assert "--registration-id" in text and "first boot" in text


def test_the_dps_token_is_scoped_to_the_registration_and_signed_with_the_device_key():
    e = dps.enrollment(SCOPE, "device-0001", group_key=GROUP_KEY)
    token = e.registration_token(time.time())
    assert "skn=registration" in token.text
    # verified by the test stand-in's own checker, written apart from the agent's sas module
    assert check_sas(token.text, f"{SCOPE}/registrations/device-0001", DERIVED.decode(),
                     time.time(), skn="registration") is None
    assert check_sas(token.text, f"{SCOPE}/registrations/device-0001", GROUP_KEY.decode(),
                     time.time()) == "signature mismatch"


@pytest.mark.parametrize("scope,hint", [
    ("One00000A0A", "digit zero"), ("0ne00000A0", "8 hexadecimal digits"),
    ("0ne00000A0AB", "0ne00000A0A"), ("0ne0000ZA0A", "hexadecimal"), ("", "empty"),
])
def test_id_scope_rules(scope, hint):
    assert hint in refused(Field.DPS_ID_SCOPE, id_scope=scope, registration_id="d",
                           symmetric_key=KEY)


@pytest.mark.parametrize("reg,hint", [
    ("Device-1", "lowercase"), ("dev 1", "character 4 is not allowed"),
    ("dev/1", "character 4"), ("-dev", "begin and end"), ("dev.", "begin and end"),
    ("a" * 129, "129 characters long; DPS allows at most 128"),
])
def test_registration_id_rules(reg, hint):
    assert hint in refused(Field.DPS_REGISTRATION_ID, id_scope=SCOPE, registration_id=reg,
                           symmetric_key=KEY)


def test_registration_ids_dps_accepts():
    for reg in ("a", "dev-1.site_2:x", "a" * 128, "3d1219c7c4c5404aaa1f6d2a48adfda4"):
        assert dps.enrollment(SCOPE, reg, symmetric_key=KEY).registration_id == reg


@pytest.mark.parametrize("key,hint", [
    (b"not base64!", "not valid base64"), (base64.b64encode(b"x" * 8), "decodes to 8 bytes"),
    (base64.b64encode(b"x" * 65), "decodes to 65 bytes"), (b"  \n", "is empty"),
])
def test_key_rules_never_show_the_key(key, hint):
    text = refused(Field.DPS_KEY, id_scope=SCOPE, registration_id="d", symmetric_key=key)
    assert hint in text and text.startswith("DPS symmetric key: ")
    text = refused(Field.DPS_KEY, id_scope=SCOPE, registration_id="d", group_key=key)
    assert text.startswith("DPS enrollment group key: ")
    if len(key.strip()) > 4:
        assert key.decode() not in text


def test_a_key_with_its_line_break_is_accepted_and_stripped():
    assert dps.enrollment(SCOPE, "d", symmetric_key=KEY + b"\n").key == KEY


@pytest.mark.parametrize("endpoint,hint", [
    ("https://global.azure-devices-provisioning.net", "bare host name"),
    ("dps.example:0", "port"), ("dps.example:x", "port"), ("bad_host", "DNS host name"),
])
def test_endpoint_rules(endpoint, hint):
    assert hint in refused(Field.DPS_ENDPOINT, id_scope=SCOPE, registration_id="d",
                           symmetric_key=KEY, endpoint=endpoint)


def test_an_endpoint_may_carry_a_port():
    e = dps.enrollment(SCOPE, "d", symmetric_key=KEY, endpoint="localhost:8443")
    assert dps.address(e.endpoint) == ("localhost", 8443)


def test_one_key_or_one_certificate():
    refused(Field.DPS_KEY, id_scope=SCOPE, registration_id="d", symmetric_key=KEY,
            group_key=KEY)
    ident = certfactory.make_identity("d", key="p256")
    refused(CERTIFICATE, id_scope=SCOPE, registration_id="d", symmetric_key=KEY,
            certificate=ident.cert_pem, private_key=ident.key_pem)


def test_x509_takes_the_registration_id_from_the_cn():
    ident = certfactory.make_identity("dev-x509", key="p256")
    e = dps.enrollment(SCOPE, certificate=ident.cert_pem, private_key=ident.key_pem)
    assert (e.attestation, e.registration_id, e.device_key) == (dps.X509, "dev-x509", None)
    assert e.key is None
    assert dps.enrollment(SCOPE, "dev-x509", certificate=ident.cert_pem,
                          private_key=ident.key_pem).registration_id == "dev-x509"


def test_x509_refuses_a_registration_id_that_is_not_the_cn():
    ident = certfactory.make_identity("dev-x509", key="p256")
    text = refused(Field.DPS_REGISTRATION_ID, id_scope=SCOPE, registration_id="other",
                   certificate=ident.cert_pem, private_key=ident.key_pem)
    assert "'other' is not the certificate's CN 'dev-x509'" in text


def test_x509_refuses_a_cn_dps_would_refuse():
    ident = certfactory.make_identity("Dev X509", key="p256")
    text = refused(Field.DPS_REGISTRATION_ID, id_scope=SCOPE, certificate=ident.cert_pem,
                   private_key=ident.key_pem)
    assert "the certificate's CN" in text


def test_x509_needs_both_files():
    ident = certfactory.make_identity("dev-x509", key="p256")
    assert "is missing" in refused(PRIVATE_KEY, id_scope=SCOPE, certificate=ident.cert_pem)
    assert "is missing" in refused(CERTIFICATE, id_scope=SCOPE, private_key=ident.key_pem)


def test_a_module_id_the_hub_refuses_is_about_the_module_id():
    text = refused(Field.MODULE_ID, id_scope=SCOPE, registration_id="d", symmetric_key=KEY,
                   module_id="Defender IoT")
    assert text.startswith("module id: character 9 is not allowed")
