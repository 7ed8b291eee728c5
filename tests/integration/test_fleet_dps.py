"""Zero-touch: ONE image, several devices, one ID scope and one group key for all.

The image has the package installed (no systemd running, no answers, as an image build does)
and no identity: only conf.json trusting the test CA and naming the test hubs' ports. Each
device boots its own copy-on-write disk of it with its own machine ID (nspawn ``--uuid``: an
image ships /etc/machine-id empty) and is given only the ID scope, the group key and the
endpoint as systemd credentials. DPS and two hubs (MQTT + module REST) are the stand-ins of
tests/hubsim/zerotouch.py, run in this process on the host's loopback, which the containers
share.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from contextlib import ExitStack

import harness
import pytest
from fleetlib import (
    AGENT_DIR,
    BOOT_TIMEOUT,
    CONF_DIR,
    IMPORT,
    MODULE,
    UNIT,
    VERIFY,
    assert_no_secret,
    boot_all,
    failed_units,
    journal,
    status_json,
    status_text,
    wait_for,
)

from tests.hubsim.zerotouch import HUBS, Stand

GROUP = base64.b64encode(bytes((i * 11 + 5) % 256 for i in range(64))).decode()
PAUSED = base64.b64encode(bytes((i * 13 + 7) % 256 for i in range(64))).decode()
# Each device's machine id, its registration id (nspawn --uuid: 32 hex digits, lowercase).
MACHINES = {"zt-1": "11111111111141118111111111111111",
            "zt-2": "22222222222242228222222222222222",
            "zt-paused": "33333333333343338333333333333333"}


@pytest.fixture(scope="module")
def zerotouch(deb, tmp_path_factory):
    work = tmp_path_factory.mktemp("zerotouch")
    work.chmod(0o700)
    with ExitStack() as stack:
        stand = stack.enter_context(Stand(work / "stand"))
        stand.dps.group("fleet", GROUP, HUBS[0])
        stand.dps.group("paused", PAUSED, HUBS[0], disabled=True)
        # The golden image: the package installed as an image build does, no identity.
        layer = harness.CACHE / "devices" / f"golden-dps-{os.getpid()}"
        stack.callback(lambda: shutil.rmtree(layer, ignore_errors=True))
        base = harness.base_image()
        build = harness.install_layer(base, deb, layer)
        assert build.returncode == 0, build.stderr[-3000:]
        conf = layer / CONF_DIR.lstrip("/")
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "hub-ca.pem").write_bytes(stand.pki.ca_file.read_bytes())
        (conf / "conf.json").write_text(json.dumps(
            {"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": stand.mqtt_port,
             "https_port": stand.https_port, "heartbeat_interval": 5}))
        # DPS listens on 127.0.0.1, which its certificate names: no resolver needed.
        endpoint = f"{HUBS[0]}:{stand.dps_port}"
        devices = {}
        for name, machine in MACHINES.items():
            creds = work / f"creds-{name}"
            creds.mkdir(mode=0o700)
            offered = {"dps-id-scope": stand.id_scope, "dps-endpoint": endpoint,
                       "dps-group-key": PAUSED if name == "zt-paused" else GROUP}
            files = {}
            for cred, value in offered.items():
                path = creds / f"defender-setup.{cred}"
                path.write_text(value + "\n")
                path.chmod(0o600)
                files[f"defender-setup.{cred}"] = str(path)
            disk = stack.enter_context(harness.device_disk([layer, base], name))
            ct = harness.Container(disk, name=f"{name}-{os.getpid() % 10000}", volatile=False,
                                   credentials=files, nspawn_args=[f"--uuid={machine}"])
            stack.callback(ct.stop)
            devices[name] = ct
        boot_all(list(devices.values()))
        yield stand, devices, build


def test_the_image_has_no_identity_and_no_key(zerotouch):
    _stand, _devices, build = zerotouch
    assert "not configured" in build.stdout + build.stderr


def test_each_device_registers_itself_and_connects_as_its_own_module(zerotouch):
    stand, devices, _build = zerotouch
    hub = stand.hubs[HUBS[0]]
    for name in ("zt-1", "zt-2"):
        ct, machine = devices[name], MACHINES[name]
        assert ct.read("/etc/machine-id").strip() == machine
        assert status_text(ct) == f"connected to {HUBS[0]} as {machine}/{MODULE}", \
            journal(ct, "-u", IMPORT, "-u", VERIFY, "-u", UNIT)
        assert failed_units(ct) == []
        assert stand.dps.registrations[machine]["assignedHub"] == HUBS[0]
        assert (machine, MODULE) in hub.rest.modules  # made by the device, with its key
        report = status_json(ct)
        assert report["origin"]["source"] == "dps"
        assert report["identity"]["device"] == machine
        assert report["last_import"]["result"] == "verified"
        # The group key: offered, used, never written by the package, never logged.
        assert_no_secret(ct, GROUP)
        found = ct.run(["grep", "-rlF", GROUP, AGENT_DIR, "/etc", "/var/lib"],
                       check=False).stdout
        assert found == "", found
    clients = {c.client_id for c in hub.broker.accepted()}
    assert {f"{MACHINES['zt-1']}/{MODULE}", f"{MACHINES['zt-2']}/{MODULE}"} <= clients


def test_a_device_in_a_disabled_enrollment_is_reported_and_stays_unconfigured(zerotouch):
    stand, devices, _build = zerotouch
    ct = devices["zt-paused"]
    assert not ct.exists(f"{AGENT_DIR}/connection_string.txt")
    assert failed_units(ct) == [IMPORT]
    log = journal(ct, "-u", IMPORT)
    assert "disabled" in log and "nothing was changed" in log, log
    assert MACHINES["zt-paused"] not in stand.dps.registrations
    assert ct.show(UNIT, "ActiveState")["ActiveState"] == "inactive"  # not crash-looping
    assert status_json(ct)["last_import"]["result"] == "failed"
    assert_no_secret(ct, PAUSED)


def test_a_device_reassigned_to_the_second_hub_follows_it(zerotouch):
    """DPS moves zt-1 to the second hub and the first forgets it: the next time the agent
    connects (a reboot, a reconnect, here a plain systemctl restart: no defender-setup command
    runs), the hub refuses the module identity, the agent's unit fails and its OnFailure= unit
    registers again once, makes the module there and the agent connects."""
    stand, devices, _build = zerotouch
    ct, machine = devices["zt-1"], MACHINES["zt-1"]
    stand.dps.reassign(machine, HUBS[1])
    stand.hubs[HUBS[0]].rest.remove_device(machine)
    ct.run(["systemctl", "restart", UNIT], check=False, timeout=BOOT_TIMEOUT)  # refused: 76
    assert wait_for(lambda: status_text(ct) ==
                    f"connected to {HUBS[1]} as {machine}/{MODULE}", 90), \
        status_text(ct) + journal(ct, "-u", "defender-setup-reprovision.service")
    said = lambda: journal(ct, "-u", "defender-setup-reprovision.service")  # noqa: E731
    assert wait_for(lambda: "Finished defender-setup-reprovision" in said(), 30), said()
    assert "registering with DPS again" in said()
    assert (machine, MODULE) in stand.hubs[HUBS[1]].rest.modules
    assert status_json(ct)["identity"]["hub"] == HUBS[1]
    # zt-2, in the same group, stays where it is.
    assert status_text(devices["zt-2"]) == f"connected to {HUBS[0]} as " \
        f"{MACHINES['zt-2']}/{MODULE}"
