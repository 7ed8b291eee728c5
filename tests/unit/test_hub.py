"""defender_setup.agent.hub without a network: back-off, the identity, os-release, settings."""

import json

import pytest

from defender_setup.agent import hub, settings
from tests.hubroot import DEVICE, KEY, MODULE, sas_text, validated, x509_text

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13


def test_websocket_settings_default_to_port_443():
    assert settings.Settings(transport="websocket").hub_port == 443
    assert settings.Settings().hub_port == 8883


def test_backoff_is_capped_exponential_with_jitter():
    b = hub.Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    low = hub.Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(3)] == [0.5, 1.0, 2.0]
    b.reset()
    assert b.next() == 1.0


def test_identity_from_validated_credentials(tmp_path, cert_inputs):
    creds = validated(sas_text(gateway="gw"))
    ident = hub.Identity.from_credentials(creds, tmp_path)
    assert (ident.client_id, ident.connect_host, ident.key) == (f"{DEVICE}/{MODULE}", "gw", KEY)
    assert KEY not in repr(ident)
    assert ident.topic == f"devices/{DEVICE}/modules/{MODULE}/messages/events/"
    x509 = validated(x509_text(), cert_inputs.certificate, cert_inputs.private_key)
    ident = hub.Identity.from_credentials(x509, tmp_path)
    assert ident.key is None and ident.cert_file.name == "certificate_public.pem"
    assert ident.thumbprint == x509.certificate.sha1_thumbprint


def test_the_heartbeat_names_the_os_release(tmp_path):
    def os_release(root):
        return json.loads(hub.HubConnector(root)._heartbeat())["osRelease"]

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('ID=debian\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    assert os_release(tmp_path) == "Debian GNU/Linux 12"
    assert os_release(tmp_path / "nothing") == "unknown"
