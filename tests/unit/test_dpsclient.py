"""defender_setup.dpsclient's pure part: DPS's and the hub's answers turned into named errors
(the network side runs against the stand-ins in tests/functional/test_provision.py)."""

import base64

import pytest

from defender_setup import dpsclient
from defender_setup.dps import enrollment
from defender_setup.dpsclient import Answer, DpsError
from defender_setup.errors import CERTIFICATE, Field
from tests import certfactory

KEY = base64.b64encode(b"k" * 32)
E = enrollment("0ne00000A0A", "dev-1", symmetric_key=KEY)
G = enrollment("0ne00000A0A", "dev-1", group_key=KEY)


def refused(answer, e=E) -> DpsError:
    return dpsclient._refused(answer, "the registration of dev-1", e, "DPS (x)")


def test_401_is_unauthorized_about_the_key_or_the_certificate():
    err = refused(Answer(401, {}, {"errorCode": 401002, "message": "Unauthorized"}))
    assert (err.reason, err.exit_code, err.field) == ("unauthorized", 65, Field.DPS_KEY)
    assert str(err).startswith("DPS symmetric key: unauthorized: DPS (x) refused the "
                               "registration of dev-1 (HTTP 401, error 401002: Unauthorized)")
    assert str(refused(Answer(401, {}, {}), G)).startswith("DPS enrollment group key: ")
    ident = certfactory.make_identity("dev-1", key="p256")
    x509 = enrollment("0ne00000A0A", certificate=ident.cert_pem, private_key=ident.key_pem)
    assert refused(Answer(403, {}, {}), x509).field == CERTIFICATE


def test_429_is_throttled_with_the_wait():
    err = refused(Answer(429, {"retry-after": "42"}, {}))
    assert (err.reason, err.exit_code) == ("throttled", 75)
    assert "asks to wait 42 s" in str(err)


def test_other_answers():
    assert refused(Answer(404, {}, {})).exit_code == 78
    assert refused(Answer(503, {}, {})).exit_code == 69


def test_what_a_peer_says_is_escaped_and_shortened():
    err = refused(Answer(500, {}, {"message": "\x1b[31mred\nline" + "x" * 500}))
    text = str(err)
    assert "\x1b" not in text and "\n" not in text and len(text) < 400


def test_an_assignment_needs_a_hub_and_a_device():
    with pytest.raises(DpsError, match="named no hub"):
        dpsclient._outcome({"status": "assigned", "registrationState": {}}, E, "DPS (x)")
    done = dpsclient._outcome({"status": "assigned", "registrationState": {
        "assignedHub": "h.example.net", "deviceId": "dev-1", "substatus": "initialAssignment"}},
        E, "DPS (x)")
    assert (done.hub, done.device_id, done.substatus) == ("h.example.net", "dev-1",
                                                          "initialAssignment")
    assert dpsclient._outcome({"status": "assigning"}, E, "DPS (x)") is None


@pytest.mark.parametrize("status,reason,code", [("disabled", "disabled", 78),
                                                ("failed", "failed", 78)])
def test_disabled_and_failed_are_named(status, reason, code):
    with pytest.raises(DpsError) as info:
        dpsclient._outcome({"status": status, "registrationState": {
            "errorCode": 400209, "errorMessage": "nope"}}, E, "DPS (x)")
    assert (info.value.reason, info.value.exit_code) == (reason, code)
    assert info.value.field == Field.DPS_ENROLLMENT and "400209: nope" in str(info.value)


@pytest.mark.parametrize("header,expected", [("3", 3.0), ("junk", 2.0), ("-5", 0.0),
                                             ("999999", 3600.0)])
def test_retry_after_is_bounded(header, expected):
    assert dpsclient._retry_after(Answer(202, {"retry-after": header}, {}), 2.0) == expected
