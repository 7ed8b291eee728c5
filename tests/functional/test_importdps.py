"""The boot import of a DPS offer against the DPS and hub stand-ins (tests/hubsim/zerotouch.py,
real TLS on loopback): a throw-away root that looks booted, a fake systemctl first on PATH."""

from __future__ import annotations

import base64

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.importdps import PROVISIONED
from defender_setup.importer import PENDING, last_import
from defender_setup.offer import REJECTED_NOTE
from tests.functional.test_importer import Importer
from tests.hubsim.zerotouch import HUBS, Stand

GROUP = base64.b64encode(bytes((i * 5 + 3) % 256 for i in range(64))).decode()
MACHINE = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"
CRED = "run/credentials/@system"

pytestmark = pytest.mark.allow_subprocess("systemctl")


@pytest.fixture
def stand(tmp_path):
    with Stand(tmp_path / "stand") as the_stand:
        the_stand.dps.group("fleet", GROUP, HUBS[0])
        yield the_stand


@pytest.fixture
def device(booted_root, stand, tmp_path, monkeypatch):
    (booted_root / "etc").mkdir(parents=True)
    (booted_root / "etc/machine-id").write_text(MACHINE + "\n")
    stand.conf(booted_root)
    return Importer(booted_root, tmp_path, monkeypatch)


def offer(root, where: str, **files) -> None:
    for name, value in files.items():
        name = name.replace("_", "-")
        path = root / where / (f"defender-setup.{name}" if where == CRED else name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
        path.chmod(0o600)


def everything(root) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_the_group_key_provisions_the_device_at_boot_and_is_not_kept(device, stand):
    root = device.root
    offer(root, CRED, dps_id_scope=stand.id_scope, dps_group_key=GROUP,
          dps_endpoint=stand.endpoint)
    code, out = device("boot")
    assert code == 0, out
    assert stand.dps.registrations[MACHINE]["assignedHub"] == HUBS[0]
    assert (MACHINE, "DefenderIotMicroAgent") in stand.hubs[HUBS[0]].rest.modules
    agent = AgentDir(root)
    assert f"DeviceId={MACHINE};".encode() in agent.current()["connection_string.txt"]
    assert agent.origin()["source"] == "dps"
    record = last_import(root)
    assert record["result"] == "written" and record["identity"]["registration_id"] == MACHINE
    assert agent.record(PENDING) is not None and device.fake.calls()  # the restart queued
    # The group key is on no file the package wrote (the offered credential aside).
    (root / CRED / "defender-setup.dps-group-key").unlink()
    assert GROUP.encode() not in everything(root) and GROUP not in out
    # The next boot, offered the same: nothing asked of DPS, nothing written.
    offer(root, CRED, dps_group_key=GROUP)
    agent.drop_record(PENDING)
    before = len(stand.dps.operations), agent.current()
    code, out = device("boot")
    assert code == 0 and "already provisioned" in out, out
    assert (len(stand.dps.operations), agent.current()) == before
    assert agent.record(PROVISIONED) is not None
    # Registered again (the digest of the offer lost), DPS gives the same module: the set is
    # unchanged, so nothing is written or restarted and no verification is pending.
    offer(root, CRED, dps_group_key=GROUP)
    agent.drop_record(PROVISIONED)
    calls, origin = len(device.fake.calls()), agent.origin()
    code, out = device("boot")
    assert code == 0 and "already provisioned" in out and "registering" in out, out
    assert agent.current() == before[1]
    assert agent.origin() == origin and agent.record(PENDING) is None
    assert "restart" not in " ".join(map(str, device.fake.calls()[calls:]))
    assert agent.record(PROVISIONED) is not None


def test_a_disabled_enrollment_is_reported_and_leaves_the_device_unconfigured(device, stand):
    root = device.root
    stand.dps.disable("fleet")
    folder = root / "boot/firmware/defender-setup"
    offer(root, "boot/firmware/defender-setup", dps_id_scope=stand.id_scope,
          dps_group_key=GROUP, dps_endpoint=stand.endpoint)
    code, out = device("boot")
    assert code != 0
    assert "disabled" in out and GROUP not in out
    assert not AgentDir(root).current()
    assert last_import(root)["result"] == "failed"
    assert "disabled" in (folder / REJECTED_NOTE).read_text()
    assert (folder / "dps-group-key").exists()  # kept: tried again at the next boot
    stand.dps.disable("fleet", False)
    code, out = device("boot")
    assert code == 0, out
    assert (folder / "dps-group-key").exists()  # until the agent is verified with the set
    code, out = device("boot-verify")
    assert code == 0, out
    assert last_import(root)["result"] == "verified"
    assert sorted(p.name for p in folder.iterdir()) == []  # imported: the folder cleared


def test_a_wrong_key_names_the_credential(device, stand):
    other = base64.b64encode(bytes(64)).decode()
    offer(device.root, CRED, dps_id_scope=stand.id_scope, dps_group_key=other,
          dps_endpoint=stand.endpoint)
    code, out = device("boot")
    assert code == 65, out
    assert "credential defender-setup.dps-group-key: unauthorized: " in out, out
    assert not AgentDir(device.root).current()


def test_a_factory_certificate_provisions_the_device_under_its_cn(device, stand):
    root = device.root
    stand.dps.x509_group("factory", HUBS[1])
    cert, key = stand.device_cert("sensor-0042")
    offer(root, CRED, dps_id_scope=stand.id_scope, dps_endpoint=stand.endpoint)
    for name, path in (("certificate", cert), ("private-key", key)):
        target = root / CRED / f"defender-setup.{name}"
        target.write_bytes(path.read_bytes())
        target.chmod(0o600)
    code, out = device("no-restart")
    assert code == 0, out
    assert stand.dps.registrations["sensor-0042"]["assignedHub"] == HUBS[1]
    stored = AgentDir(root).current()["connection_string.txt"]
    assert f"HostName={HUBS[1]};DeviceId=sensor-0042;".encode() in stored
    assert b"PRIVATE KEY" not in b"".join(
        p.read_bytes() for p in (root / "var").rglob("*") if p.is_file())


def test_import_by_hand_registers_restarts_and_verifies(device, stand, tmp_path, monkeypatch):
    from tests.fakes import running

    root = device.root
    (tmp_path / "manual").mkdir()
    device = Importer(root, tmp_path / "manual", monkeypatch, restart_plan=[
        {"states": [dict(running(inv="inv-2"), LoadState="loaded")]}])
    folder = root / "boot/defender-setup"
    offer(root, "boot/defender-setup", dps_id_scope=stand.id_scope, dps_group_key=GROUP,
          dps_endpoint=stand.endpoint)
    code, out = device("manual")
    assert code == 0, out
    assert last_import(root)["result"] == "verified"
    assert len(device.fake.restarts()) == 1  # restarted and judged now, not queued
    assert list(folder.iterdir()) == []  # provisioned and verified: the folder emptied
