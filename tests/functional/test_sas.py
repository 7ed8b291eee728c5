"""SAS tokens verified by the independent test hub (tests/hubsim), over a real connection."""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from defender_setup.agent import sas
from tests.hubsim.sasauth import SasAuth

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13


@given(device=st.text(alphabet="abcXYZ019-.:@", min_size=1, max_size=20),
       module=st.text(alphabet="abcXYZ019-.", min_size=1, max_size=20),
       key=st.binary(min_size=1, max_size=64))
def test_tokens_verify_in_the_independent_test_hub(device, module, key):
    key_b64 = base64.b64encode(key).decode()
    auth = SasAuth("h.example", {(device, module): key_b64}, clock=lambda: 100)
    token = sas.new_token(sas.resource_uri("h.example", device, module), key_b64, 60, now=100)
    user = f"h.example/{device}/{module}/?api-version=2021-04-12"
    assert auth(f"{device}/{module}", user, token.text.encode()) == 0, auth.last_reason
    later = SasAuth("h.example", {(device, module): key_b64}, clock=lambda: 161)
    assert later(f"{device}/{module}", user, token.text.encode()) == 5
