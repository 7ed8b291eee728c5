"""defender_setup.agent.hub, X.509 path, against Debian's mosquitto on loopback with TLS and a
test CA that requires and verifies client certificates (tests/hubsim/mosquitto.py)."""

import shutil

import pytest

from defender_setup.agent import hub, settings
from tests.hubsim.mosquitto import MOSQUITTO, Mosquitto

from .test_hub import DEVICE, MODULE, started

pytestmark = [
    pytest.mark.hub,
    pytest.mark.allow_subprocess("mosquitto"),
    pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto is not installed"),
]


@pytest.fixture
def broker(hub_pki, tmp_path):
    with Mosquitto(hub_pki, tmp_path) as running:
        yield running


def connect(hub_pki, broker, cert, key, **kw):
    ident = hub.Identity("localhost", DEVICE, MODULE, None, None, cert, key, "0A1B2C")
    connector = hub.HubConnector(settings=settings.Settings(ca_file=hub_pki.ca_file,
                                                            port=broker.port),
                                 ready_timeout=5.0, backoff=(0.1, 0.5), **kw)
    return connector, started(connector, ident)


def test_accepted_certificate(hub_pki, broker):
    cert, key = hub_pki.client(f"{DEVICE}/{MODULE}")
    c, n = connect(hub_pki, broker, cert, key)
    try:
        assert n.failed is None, n.failed
        assert n.statuses[-1] == f"connected to localhost as {DEVICE}/{MODULE}"
        assert broker.log_text().count(f"as {DEVICE}/{MODULE}") >= 1
    finally:
        c.stop()


def test_unknown_certificate_is_a_rejection_naming_the_thumbprint(hub_pki, broker):
    cert, key = hub_pki.stranger(f"{DEVICE}/{MODULE}")
    c, n = connect(hub_pki, broker, cert, key)
    # With TLS 1.3 the alert races paho's first write: about one attempt in 15 sees only an
    # EOF, which is retried as "unreachable" (never a rollback without evidence); the next
    # attempt reads the alert.
    n.wait(lambda: n.failed is not None, 10)
    c.stop()
    assert n.failed is not None, n.everything()
    code, line = n.failed
    assert code == hub.EX_REJECTED
    assert line.startswith(f"hub rejected the client certificate of localhost as {DEVICE}/{MODULE}")
    assert "0A1B2C" in line and "not registered" in line
    assert "-----BEGIN" not in n.everything()


def test_unreadable_client_key_is_a_config_failure(hub_pki, broker, tmp_path):
    cert, _ = hub_pki.client(f"{DEVICE}/{MODULE}")
    missing = tmp_path / "missing.key"
    c, n = connect(hub_pki, broker, cert, missing)
    assert n.failed is not None
    assert n.failed[0] == 78
    assert n.failed[1].startswith("not starting: cannot load the client certificate and key")


def test_encrypted_key_never_prompts(hub_pki, broker, tmp_path):
    from tests import certfactory

    ident = certfactory.make_identity("x", key=certfactory.private_key("p256", 3),
                                      issuer=hub_pki.ca)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(ident.cert_pem)
    key.write_bytes(certfactory.encrypted_pem(ident.key))
    c, n = connect(hub_pki, broker, cert, key)
    assert n.failed[0] == 78 and "cannot load the client certificate" in n.failed[1]


def test_the_twin_is_reported_to_mosquitto_as_the_certificate_identity(hub_pki, broker):
    cert, key = hub_pki.client(f"{DEVICE}/{MODULE}")
    c, n = connect(hub_pki, broker, cert, key)
    try:
        assert n.failed is None, n.failed
        assert broker.wait_for(lambda: (DEVICE, MODULE) in broker.reported)
        props = broker.reported[(DEVICE, MODULE)]["defenderSetup"]
        assert props["agentVersion"] and props["schemaVersion"] == 1
        assert n.wait(lambda: any("reported properties updated" in line
                                  for _, line in n.lines), 5), n.lines  # the 204 came back
    finally:
        c.stop()
    assert all(b"BEGIN" not in payload for *_, payload, _ in broker.twin_patches)
