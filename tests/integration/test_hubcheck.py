"""``check``'s network checks and the pre-flight probe in a booted system, against a real hub.

The hub (tests/hubsim: the MQTT broker that verifies SAS tokens against the device key) runs
in this test process on the host's 127.0.0.1. The container shares the host's network (nspawn
without --private-network); its /etc/hosts maps the hub's name to 127.0.0.1, so DNS, TLS (the
test server certificate names the hub) and the identity all use the real HostName, and
conf.json trusts the test CA and names the hub's port.
"""

from __future__ import annotations

import json
import time

import harness
import pytest
from conftest import AGENT_DIR, UNIT, Preseed
from test_package import VERDICT, agent_files, assert_no_leak, state
from test_package_dialog import enter_connection_string, reconfigure_on_screen

from tests.hubsim.broker import Broker
from tests.hubsim.mosquitto import free_port
from tests.hubsim.pki import Pki
from tests.hubsim.sasauth import SasAuth

CONF_DIR = "/etc/defender_iot_micro_agent"
MODULE = "DefenderIotMicroAgent"
GOOD, WRONG = Preseed.sas_key(1), Preseed.sas_key(9)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("hubcheck-pki"), names=("localhost", Preseed.HUB))


@pytest.fixture
def hub(pki):
    """The hub knows dev1 with key 1 only."""
    broker = Broker(auth=SasAuth(Preseed.HUB, {("dev1", MODULE): GOOD}),
                    tls=(pki.server_cert, pki.server_key))
    broker.start()
    yield broker
    broker.stop()


def wire(ct, pki, port: int) -> None:
    """The hub's name, CA and port, as an administrator of a private hub would set them."""
    ct.sh(f"echo '127.0.0.1 {Preseed.HUB}' >> /etc/hosts")
    ct.copy_in(pki.ca_file, f"{CONF_DIR}/hub-ca.pem", mode=0o644)
    ct.copy_in(json.dumps({"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": port}),
               f"{CONF_DIR}/conf.json", mode=0o644)


def tree(ct) -> str:
    """Every file of the agent's directories with inode, mode, size and modification time."""
    return ct.run(["find", AGENT_DIR, CONF_DIR, "-printf", "%p %i %m %s %T@\\n"]).stdout


def connected(ct) -> bool:
    return ct.show(UNIT, "StatusText")["StatusText"] == \
        f"connected to {Preseed.HUB} as dev1/{MODULE}"


def install_connected(ct, pki, hub, preseed) -> None:
    """A preseeded install with the probe on: the config script and the postinst both see the
    new credentials, yet the hub hears them twice only: one probe for the whole dpkg run, then
    the agent (a second CONNECT as the same identity would knock the agent off the hub)."""
    wire(ct, pki, hub.port)
    ct.install_deb(preseed=preseed.for_connection_string(preseed.connection_string(key=GOOD)))
    assert connected(ct), ct.show(UNIT, "StatusText")
    assert [(c.username.split("/")[1], c.code) for c in hub.connections] == \
        [("dev1", 0), ("dev1", 0)], hub.connections


def test_check_diagnoses_the_path_and_leaves_the_connected_agent_alone(boot, base, pki, hub,
                                                                        preseed):
    ct = boot(base, prefix="hubchk")
    install_connected(ct, pki, hub, preseed)
    before, unit, seen = tree(ct), state(ct), len(hub.connections)

    start = time.monotonic()
    r = ct.run(["defender-setup", "check"], check=False)
    took = time.monotonic() - start
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert f"[ ok ] hub-dns: the hub's name resolves (through the proxy when one is set)\n" \
           f"    {Preseed.HUB} resolves to 127.0.0.1" in out, out
    assert f"[ ok ] hub-tcp: the hub's port accepts a TCP connection\n    connected to " \
           f"{Preseed.HUB}:{hub.port}" in out, out
    assert f"verified against ca_file {CONF_DIR}/hub-ca.pem" in out
    assert "[skip] hub-clock" in out and "no time source" in out   # nothing on 443 here
    assert "[ ok ] hub-auth: the hub accepts the stored identity\n    not connecting a second " \
           f"time: the running agent reports 'connected to {Preseed.HUB} as dev1/{MODULE}'" \
           in out, out
    assert took < 10
    # read-only: no CONNECT reached the hub, nothing changed on disk, no restart
    assert len(hub.connections) == seen
    assert tree(ct) == before and state(ct) == unit

    checks = json.loads(ct.run(["defender-setup", "check", "--json"]).stdout)["checks"]
    assert all(set(c) == {"id", "description", "status", "message", "exit_code"} for c in checks)
    assert {c["id"]: c["status"] for c in checks}["hub-auth"] == "ok"

    # another user is told why it needs root, and nothing is read or changed
    r = ct.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                "defender-setup", "check"], check=False)
    assert r.returncode == 77
    assert r.stderr.startswith(f"defender-setup: check needs root: the credentials in "
                               f"{AGENT_DIR} are readable by root only"), r.stderr

    # the hub unreachable: the checks say where it stops, in well under 10 s
    ct.copy_in(json.dumps({"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": free_port()}),
               f"{CONF_DIR}/conf.json", mode=0o644)
    start = time.monotonic()
    r = ct.run(["defender-setup", "check"], check=False)
    assert time.monotonic() - start < 10
    assert r.returncode == 69, r.stdout
    assert "[FAIL] hub-tcp" in r.stdout and "connection refused by" in r.stdout
    assert "[skip] hub-auth: the hub accepts the stored identity\n    needs hub-tls" in r.stdout


def test_preseeded_wrong_key_fails_the_dpkg_run_before_any_file_changes(boot, base, pki, hub,
                                                                        preseed):
    ct = boot(base, prefix="hubchk")
    install_connected(ct, pki, hub, preseed)
    before, unit, files = tree(ct), state(ct), agent_files(ct)

    ct.preseed(preseed.for_connection_string(preseed.connection_string(key=WRONG)))
    r = ct.run(["dpkg-reconfigure", "-fnoninteractive", "defender-setup"], check=False,
               env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    lines = [x for x in out.splitlines() if x.startswith("defender-setup: invalid")]
    assert len(lines) == 1, out
    assert lines[0].startswith("defender-setup: invalid connection string: the hub refused "
                               "this key (CONNACK 5, not authorized): likely a wrong "
                               "SharedAccessKey"), lines
    assert lines[0].endswith("(debconf question defender-setup/connection-string)")
    assert hub.connections[-1].code == 5
    # nothing written, nothing restarted, and the refused key is not kept anywhere
    assert tree(ct) == before and agent_files(ct) == files and state(ct) == unit
    assert connected(ct)
    assert WRONG not in out
    assert_no_leak(ct, [WRONG], rejected_by_reconfigure=True)

    # the package is still usable: the right key goes through, probed and verified
    ct.preseed(preseed.for_connection_string(preseed.connection_string(key=GOOD)))
    r = ct.run(["dpkg-reconfigure", "-fnoninteractive", "defender-setup"],
               env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=180)
    assert "credentials unchanged" in r.stdout + r.stderr


def test_dialog_reasks_a_key_the_hub_refuses_with_its_answer(boot, pki, hub, preseed):
    ct = boot(harness.base_image(extra=("whiptail",)), prefix="hubchk")
    wire(ct, pki, hub.port)
    ct.install_deb()
    screen = reconfigure_on_screen(ct)
    try:
        enter_connection_string(screen, preseed.connection_string(key=WRONG))
        screen.wait_for("Fail the installation")
        screen.keys("Enter")                             # strict verification: default (no)
        screen.wait_for("Try the new credentials")
        screen.keys("Enter")                             # the probe: default (yes)
        screen.wait_for("Seal the secret files")
        screen.keys("Enter")                             # sealing: default (no)
        text = screen.wait_for("Invalid")                # the hub's answer, before writing
        assert "the hub refused this key (CONNACK 5, not authorized)" in " ".join(text.split())
        assert not ct.exists(f"{AGENT_DIR}/connection_string.txt")
        screen.keys("Enter")
        screen.wait_for("Module connection string")      # asked again
        screen.paste(preseed.connection_string(key=GOOD))
        screen.keys("Enter")
        text = screen.wait_for("EXIT=", timeout=90, history=True)
        assert "EXIT=0" in text and VERDICT in text, text
        assert "probe: the hub accepted" in text
        assert WRONG not in text and GOOD not in text
    finally:
        screen.close()
    assert connected(ct)
    assert [c.code for c in hub.connections][:2] == [5, 0]   # the probe's refusal, then its yes
