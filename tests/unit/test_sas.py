"""defender_setup.agent.sas: token format, signature, lifetime and renewal timing."""

import base64
import hashlib
import hmac
import urllib.parse

import pytest

from defender_setup.agent import sas

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13

KEY = base64.b64encode(bytes(range(32))).decode()


def test_resource_uri_keeps_case():
    assert sas.resource_uri("h.azure-devices.net", "Dev", "DefenderIotMicroAgent") == \
        "h.azure-devices.net/devices/Dev/modules/DefenderIotMicroAgent"


def test_token_format_and_signature_known_answer():
    resource = "myhub.azure-devices.net/devices/dev1/modules/DefenderIotMicroAgent"
    token = sas.make_token(resource, KEY, 1700000000)
    encoded = "myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2FDefenderIotMicroAgent"
    # Computed independently here from the documented rule.
    digest = hmac.new(bytes(range(32)), f"{encoded}\n1700000000".encode(), hashlib.sha256)
    sig = urllib.parse.quote(base64.b64encode(digest.digest()).decode(), safe="")
    assert token.text == f"SharedAccessSignature sr={encoded}&sig={sig}&se=1700000000"
    assert token.expiry == 1700000000 and "skn=" not in token.text


def test_repr_hides_token():
    token = sas.make_token("h/devices/d/modules/m", KEY, 1700000000)
    assert "sig" not in repr(token) and token.text not in repr(token)
    assert "1700000000" in repr(token)


def test_new_token_lifetime():
    token = sas.new_token("h/devices/d/modules/m", KEY, lifetime=60, now=1000.7)
    assert token.expiry == 1060


@pytest.mark.parametrize("bad", ["not base64!", "", "   "])
def test_bad_key_message_has_no_key(bad):
    with pytest.raises(ValueError) as err:
        sas.make_token("h/devices/d/modules/m", bad, 1)
    assert "SharedAccessKey" in str(err.value)
    if bad.strip():
        assert bad not in str(err.value)


def test_renewal_before_expiry():
    assert sas.renewal_delay(3600) == 2880
    assert sas.renewal_delay(5) == 4
    assert sas.renewal_delay(1) == 1.0


def test_clock_hint():
    assert sas.clock_looks_wrong(86400) .startswith("the system clock says 1970-01-02")
    assert sas.clock_looks_wrong(1_800_000_000) is None
