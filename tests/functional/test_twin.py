"""The module twin's reported properties, from the agent process (``python3 -m
defender_setup.agent``) to the test hub (tests/hubsim), which merges them as IoT Hub does.

The facts the provisioning side records (origin, last change, last verification) are written
the way the commands write them (AgentDir, facts.settled); the agent sees them change.
"""

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

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


def configure(root, pki, port, origin="apply", interval=1, cert=None, key=None, heartbeat=0):
    text = hubroot.x509_text() if cert else hubroot.sas_text()
    method = "certificate" if cert else "connection-string"
    AgentDir(root).write(validate(method, text, cert, key).files, origin=origin)
    hubroot.configure(root, pki, port=port, twin_interval=interval,
                      heartbeat_interval=heartbeat)


def sas_broker(pki, **options):
    return Broker(auth=SasAuth(HUB, {(DEVICE, MODULE): KEY}),
                  tls=(pki.server_cert, pki.server_key), **options)


def reported(hub):
    return hub.reported.get((DEVICE, MODULE), {}).get(twin.KEY)


@dataclass
class Stand:
    root: Path
    hub: Broker
    agent: Agent

    def connected(self):
        assert self.agent.wait_status(lambda s: s == CONNECTED), self.agent.messages


@pytest.fixture
def stand(hub_pki, tmp_path):
    """``stand(hub=None, **configure options)``: the hub (a SAS test hub unless given) started,
    the agent configured for it and started; both are stopped at the end, whatever happened."""
    stops = []

    def start(hub=None, **options):
        hub = hub or sas_broker(hub_pki)
        hub.start()
        stops.append(hub.stop)
        root = tmp_path / "root"
        configure(root, hub_pki, hub.port, **options)
        agent = Agent.start(root, tmp_path)
        stops.append(agent.close)
        return Stand(root, hub, agent)

    yield start
    for stop in reversed(stops):
        stop()


def test_properties_arrive_on_connect_and_follow_the_verdict(stand):
    s = stand(origin="debconf")
    s.connected()
    hub = s.hub
    assert hub.wait_for(lambda: reported(hub) is not None)
    first = reported(hub)
    assert first["method"] == "connection-string" and first["origin"] == "debconf"
    assert first["lastChange"]["result"] == "written" and first["sealed"] is False
    assert "certificate" not in first  # null: no such field in the twin
    assert first["agentVersion"] and first["schemaVersion"] == 1
    # the verification judges the change: the agent reports it, as the same identity
    facts.settled(s.root, "healthy", facts.pending_change(s.root))
    assert hub.wait_for(lambda: (reported(hub) or {}).get("lastVerification"), 10)
    assert reported(hub)["lastChange"]["result"] == "verified"
    assert {c.client_id for c in hub.accepted()} == {f"{DEVICE}/{MODULE}"}
    assert len(hub.accepted()) == 1  # the same connection
    code, _, err = s.agent.terminate()
    assert code == 0
    assert "twin: reported properties updated" in err and "Traceback" not in err
    for _, topic, payload, _ in hub.twin_patches:
        assert topic.startswith("$iothub/twin/PATCH/properties/reported/?$rid=")
        assert len(payload) <= twin.MAX_BODY


def test_changes_are_rate_limited_and_coalesced(stand):
    s = stand(interval=2)
    s.connected()
    hub = s.hub
    assert hub.wait_for(lambda: len(hub.twin_patches) == 1)  # on connect
    # Changes one after another, faster than the interval, until the agent reports one
    # (paced: the stand-in for commands storing sets; the wait is for the hub's PATCH).
    changes, deadline = 0, time.monotonic() + 10
    while len(hub.twin_patches) < 2:
        assert time.monotonic() < deadline, f"no PATCH after {changes} changes in 10 s"
        facts.changed(s.root, {"source": ("apply", "credential", "drop-folder")[changes % 3]})
        changes += 1
        time.sleep(0.05)
    facts.changed(s.root, {"source": "dps"})  # the last one is reported too, in its turn
    assert hub.wait_for(lambda: reported(hub)["origin"] == "dps", 10)
    code, _, _ = s.agent.terminate()
    assert code == 0
    times = [received for *_, received in hub.twin_patches]
    # the connect, one for the whole stream, one for the last change: never closer than 2 s
    assert len(times) == 3 and changes > 5, (times, changes)
    assert all(b - a >= 1.9 for a, b in zip(times, times[1:])), times


def heartbeats(hub) -> int:
    return sum(json.loads(payload).get("type") == "heartbeat" for *_, payload in hub.messages)


@pytest.mark.parametrize("mode", ["ignore", "fail"])
def test_a_twin_that_is_silent_or_fails_changes_nothing_else(stand, hub_pki, mode):
    s = stand(sas_broker(hub_pki, twin=mode), heartbeat=5)
    hub, agent = s.hub, s.agent
    assert agent.next_message() == f"READY=1\nSTATUS={CONNECTED}"
    assert hub.wait_for(lambda: hub.twin_patches)
    if mode == "fail":  # an error answer is tried again 2 s later (then 4 s later, ...)
        assert hub.wait_for(lambda: len(hub.twin_patches) == 2, 10), "not tried again"
        first, again = (received for *_, received in hub.twin_patches)
        assert again - first >= 1.9, (first, again)
    else:  # no answer: no other PATCH for 30 s. A heartbeat goes every 5 s on the same
        # connection: once the second has arrived, so has any PATCH the agent sent before it.
        assert hub.wait_for(lambda: heartbeats(hub) >= 2, 15), "no second heartbeat"
    assert agent.proc.poll() is None
    assert len(hub.accepted()) == 1  # never reconnected
    assert all("twin" not in topic for _, topic, _ in hub.messages)
    code, took, err = agent.terminate()
    assert code == 0 and took < 3
    assert not any(line.startswith("STATUS=") and line != f"STATUS={CONNECTED}"
                   for message in agent.messages for line in message.splitlines())
    if mode == "fail":
        assert err.count("twin: the hub answered 500 to the reported properties") == 1, err
        assert len(hub.twin_patches) == 2  # at once, then 2 s later (then 4 s)
    else:
        assert len(hub.twin_patches) == 1  # one at a time; no answer waits 30 s
    assert "Traceback" not in err and reported(hub) is None


def test_no_secret_of_the_set_is_published(stand, hub_pki):
    """Certificate identity (the test hub requiring client certificates): the payloads hold
    the expiry, and nothing of the key, the certificate or the connection string."""
    cert_path, key_path = hub_pki.client(f"{DEVICE}/{MODULE}")
    cert, key = cert_path.read_bytes(), key_path.read_bytes()
    s = stand(Broker(auth=lambda *_: 0, tls=(hub_pki.server_cert, hub_pki.server_key),
                     client_ca=hub_pki.ca_file), cert=cert, key=key)
    s.connected()
    hub = s.hub
    assert hub.wait_for(lambda: reported(hub) is not None)
    props = reported(hub)
    code, _, _ = s.agent.terminate()
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
