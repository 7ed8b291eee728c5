"""Zero-touch in a booted system: ``defender-setup provision`` with the installed package, the
agent under systemd, the stand-ins (tests/hubsim/zerotouch.py) on the host's loopback, which
the container shares: registration, the module made on the device, the agent connected as it,
``check``'s DPS checks, then the device re-assigned to the second hub and following it when
the old hub refuses it. One container does all of it (the fleet of devices booted from one
image is another test's)."""

from __future__ import annotations

import base64
import json

import pytest

from tests.hubsim.zerotouch import Stand

UNIT = "defender-iot-micro-agent.service"
CONF_DIR = "/etc/defender_iot_micro_agent"
MODULE = "DefenderIotMicroAgent"
SCOPE = "0ne00000A0A"
GROUP_KEY = base64.b64encode(bytes(range(100, 132))).decode()


@pytest.fixture
def stand(tmp_path):
    with Stand(tmp_path / "stand") as s:
        s.dps.group("fleet", GROUP_KEY, "127.0.0.1")
        yield s


def test_a_booted_device_provisions_itself_and_follows_a_reassignment(boot, base, stand):
    ct = boot(base, prefix="dps")
    ct.copy_in(stand.pki.ca_file, f"{CONF_DIR}/hub-ca.pem", mode=0o644)
    ct.copy_in(json.dumps({"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": stand.mqtt_port,
                           "https_port": stand.https_port}), f"{CONF_DIR}/conf.json",
               mode=0o644)
    ct.install_deb()  # no answers: unconfigured
    ct.copy_in(GROUP_KEY, "/root/group.key")
    endpoint = f"127.0.0.1:{stand.dps_port}"
    r = ct.run(["defender-setup", "provision", "--id-scope", SCOPE, "--registration-id",
                "booted-1", "--group-key-file", "/root/group.key", "--endpoint", endpoint])
    assert f"module booted-1/{MODULE} created on 127.0.0.1" in r.stdout, r.stdout
    assert f"status: connected to 127.0.0.1 as booted-1/{MODULE}" in r.stdout, r.stdout
    assert stand.hubs["127.0.0.1"].broker.accepted()[-1].client_id == f"booted-1/{MODULE}"
    checks = {c["id"]: c for c in json.loads(ct.run(["defender-setup", "check", "--json"],
                                                    check=False).stdout)["checks"]}
    assert checks["dps-auth"]["status"] == "ok", checks["dps-auth"]

    # DPS moves the device to the second hub; the first one forgets it
    stand.dps.reassign("booted-1", "127.0.0.2")
    stand.hubs["127.0.0.1"].rest.remove_device("booted-1")
    r = ct.run(["defender-setup", "restart"])
    assert "registering with DPS again (once)" in r.stdout, r.stdout
    assert f"status: connected to 127.0.0.2 as booted-1/{MODULE}" in r.stdout, r.stdout
    assert ct.show(UNIT, "StatusText")["StatusText"] == \
        f"connected to 127.0.0.2 as booted-1/{MODULE}"
    status = ct.run(["defender-setup", "status"]).stdout
    assert "DPS assignment:  hub 127.0.0.2, device booted-1" in status, status

    # the group key was never written by the package, nor logged
    ct.run(["rm", "/root/group.key"])
    found = ct.run(["grep", "-rlF", GROUP_KEY, "/var", "/etc", "/run", "/root"],
                   check=False).stdout
    assert found == "", found
    assert GROUP_KEY not in ct.run(["journalctl", "-o", "cat"]).stdout
