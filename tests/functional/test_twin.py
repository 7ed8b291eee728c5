"""The module twin's reported properties, from the agent process (``python3 -m
defender_setup.agent``) to the test hub (tests/hubsim), which merges them as IoT Hub does.

The facts the provisioning side records (origin, last change, last verification) are written
the way the commands write them (AgentDir, facts.settled); the agent sees them change.
"""

import base64
import json
import time

import pytest

from defender_setup import facts
from defender_setup.agent import twin
from defender_setup.agentdir import AgentDir
from defender_setup.credentials import validate
from tests import hubroot
from tests.agentproc import DEVICE, HUB, KEY, MODULE, Agent
from tests.hubsim.broker import Broker
from tests.hubsim.sasauth import SasAuth

pytestmark = [pytest.mark.hub, pytest.mark.allow_subprocess("python3")]

CONNECTED = f"connected to {HUB} as {DEVICE}/{MODULE}"


def configure(root, pki, port, origin="apply", interval=1, cert=None, key=None):
    text = hubroot.x509_text() if cert else hubroot.sas_text()
    method = "certificate" if cert else "connection-string"
    AgentDir(root).write(validate(method, text, cert, key).files, origin=origin)
    hubroot.configure(root, pki, port=port, twin_interval=interval, heartbeat_interval=0)


def sas_broker(pki, **options):
    broker = Broker(auth=SasAuth(HUB, {(DEVICE, MODULE): KEY}),
                    tls=(pki.server_cert, pki.server_key), **options)
    broker.start()
    return broker


def reported(hub):
    return hub.reported.get((DEVICE, MODULE), {}).get(twin.KEY)


def run(root, tmp_path):
    agent = Agent.start(root, tmp_path)
    assert agent.wait_status(lambda s: s == CONNECTED), agent.messages
    return agent


def test_properties_arrive_on_connect_and_follow_the_verdict(hub_pki, tmp_path):
    root = tmp_path / "root"
    hub = sas_broker(hub_pki)
    agent = None
    try:
        configure(root, hub_pki, hub.port, origin="debconf")
        agent = run(root, tmp_path)
        assert hub.wait_for(lambda: reported(hub) is not None)
        first = reported(hub)
        assert first["method"] == "connection-string" and first["origin"] == "debconf"
        assert first["lastChange"]["result"] == "written" and first["sealed"] is False
        assert "certificate" not in first  # null: no such field in the twin
        assert first["agentVersion"] and first["schemaVersion"] == 1
        # the verification judges the change: the agent reports it, as the same identity
        facts.settled(root, "healthy", facts.pending_change(root))
        assert hub.wait_for(lambda: (reported(hub) or {}).get("lastVerification"), 10)
        assert reported(hub)["lastChange"]["result"] == "verified"
        assert {c.client_id for c in hub.accepted()} == {f"{DEVICE}/{MODULE}"}
        assert len(hub.accepted()) == 1  # the same connection
        code, _, err = agent.terminate()
    finally:
        if agent:
            agent.close()
        hub.stop()
    assert code == 0
    assert "twin: reported properties updated" in err and "Traceback" not in err
    for _, topic, payload, _ in hub.twin_patches:
        assert topic.startswith("$iothub/twin/PATCH/properties/reported/?$rid=")
        assert len(payload) <= twin.MAX_BODY


def test_changes_are_rate_limited_and_coalesced(hub_pki, tmp_path):
    root = tmp_path / "root"
    hub = sas_broker(hub_pki)
    agent = None
    try:
        configure(root, hub_pki, hub.port, interval=3)
        agent = run(root, tmp_path)
        assert hub.wait_for(lambda: len(hub.twin_patches) == 1)
        for origin in ("apply", "credential", "drop-folder", "dps"):  # a burst of changes
            facts.changed(root, {"source": origin})
            time.sleep(0.3)
        assert hub.wait_for(lambda: reported(hub)["origin"] == "dps", 15)
        time.sleep(1)
        code, _, _ = agent.terminate()
    finally:
        if agent:
            agent.close()
        hub.stop()
    assert code == 0
    times = [received for *_, received in hub.twin_patches]
    assert len(times) <= 3, times  # the connect, then at most two for the whole burst
    assert all(b - a >= 2.9 for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("mode", ["ignore", "fail"])
def test_a_twin_that_is_silent_or_fails_changes_nothing_else(hub_pki, tmp_path, mode):
    root = tmp_path / "root"
    hub = sas_broker(hub_pki, twin=mode)
    agent = None
    try:
        configure(root, hub_pki, hub.port)
        agent = Agent.start(root, tmp_path)
        assert agent.next_message() == f"READY=1\nSTATUS={CONNECTED}"
        assert hub.wait_for(lambda: hub.twin_patches)
        time.sleep(2.5)  # an error answer is tried again 2 s later: still connected after
        assert agent.proc.poll() is None
        assert len(hub.accepted()) == 1  # never reconnected
        assert hub.messages == [] or all("twin" not in m[1] for m in hub.messages)
        code, took, err = agent.terminate()
    finally:
        if agent:
            agent.close()
        hub.stop()
    assert code == 0 and took < 3
    assert not any(line.startswith("STATUS=") and line != f"STATUS={CONNECTED}"
                   for message in agent.messages for line in message.splitlines())
    if mode == "fail":
        assert err.count("twin: the hub answered 500 to the reported properties") == 1, err
        assert len(hub.twin_patches) == 2  # at once, then 2 s later (then 4 s)
    else:
        assert len(hub.twin_patches) == 1  # one at a time; no answer waits 30 s
    assert "Traceback" not in err and reported(hub) is None


def test_no_secret_of_the_set_is_published(hub_pki, tmp_path):
    """Certificate identity (the test hub requiring client certificates): the payloads hold
    the expiry, and nothing of the key, the certificate or the connection string."""
    root = tmp_path / "root"
    cert_path, key_path = hub_pki.client(f"{DEVICE}/{MODULE}")
    cert, key = cert_path.read_bytes(), key_path.read_bytes()
    hub = Broker(auth=lambda *_: 0, tls=(hub_pki.server_cert, hub_pki.server_key),
                 client_ca=hub_pki.ca_file)
    hub.start()
    agent = None
    try:
        configure(root, hub_pki, hub.port, cert=cert, key=key)
        agent = run(root, tmp_path)
        assert hub.wait_for(lambda: reported(hub) is not None)
        props = reported(hub)
        code, _, _ = agent.terminate()
    finally:
        if agent:
            agent.close()
        hub.stop()
    assert code == 0
    assert props["method"] == "certificate"
    assert props["certificate"]["notAfter"].endswith("Z")
    secrets = [key, cert, KEY.encode(), base64.b64decode(KEY)]
    secrets += [line for line in key.splitlines() + cert.splitlines()
                if len(line) > 16 and not line.startswith(b"-----")]
    for *_, payload, _ in hub.twin_patches:
        for secret in secrets:
            assert secret not in payload
        assert b"PRIVATE" not in payload and b"SharedAccess" not in payload
        json.loads(payload)  # JSON, nothing else
