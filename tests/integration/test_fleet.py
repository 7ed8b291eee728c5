"""One golden image, many devices: each device gets its own identity when it boots.

ONE image with the package installed and no answers, booted as many devices in parallel, each
with its own offer (see fleetlib for how the image, the devices and the hubs are made): two
SAS devices, an X.509 device, a wrong key, an invalid credential, nothing at all; reboots with
the same and with a new credential; then the other channels (credstore, credstore.encrypted
with the import run again while the agent runs, the boot partition's drop folder).
"""

from __future__ import annotations

import re

import pytest
from fleetlib import (
    AGENT_DIR,
    BOOT_TIMEOUT,
    CS,
    HUB,
    IMPORT,
    MODULE,
    UNIT,
    VERIFY,
    agent_starts,
    assert_no_secret,
    boot_all,
    checks,
    failed_units,
    files_state,
    journal,
    key,
    put,
    running,
    sas_string,
    status_json,
    status_text,
    wait_for,
    x509_string,
)

# The hub's registry: device -> key. "wrong-1" exists, but its device is offered another key.
REGISTERED = {"sas-1": key(1), "sas-2": key(2), "wrong-1": key(3), "rekeyed-1": key(4),
              "cred-1": key(5), "enc-1": key(6), "enc-2": key(8), "drop-1": key(7),
              "sealed-1": key(9)}


@pytest.fixture(scope="module")
def fleet(deb, tmp_path_factory):
    with running(deb, tmp_path_factory.mktemp("fleet"), REGISTERED) as the_fleet:
        yield the_fleet


@pytest.fixture(scope="module")
def devices(fleet):
    """The whole fleet's first boot: six devices, one image, each with its own offer."""
    cert, priv = fleet.x509_pki.client(f"x509-1/{MODULE}")
    wrong = key(99)  # well-formed, but not wrong-1's key: the hub refuses it
    offers = {
        "sas-1": fleet.credentials(connection_string=sas_string("sas-1", REGISTERED["sas-1"])),
        "sas-2": fleet.credentials(connection_string=sas_string("sas-2", REGISTERED["sas-2"])),
        "x509-1": fleet.credentials(connection_string=x509_string("x509-1"),
                                    certificate=cert.read_bytes(),
                                    private_key=priv.read_bytes()),
        "wrong-1": fleet.credentials(connection_string=sas_string("wrong-1", wrong)),
        "bad-1": fleet.credentials(connection_string=sas_string("bad-1", "not*base64")),
        "blank": {},
    }
    found = Devices({name: fleet.device(name, creds) for name, creds in offers.items()})
    found.secrets = {"sas-1": [REGISTERED["sas-1"]], "sas-2": [REGISTERED["sas-2"]],
                     "x509-1": [pem_body(priv.read_bytes())], "wrong-1": [wrong]}
    boot_all(list(found.values()))
    return found


class Devices(dict):
    secrets: dict


def pem_body(pem: bytes) -> str:
    """A line from the middle of a PEM key: what a leak would contain."""
    return pem.decode().splitlines()[2]


def test_the_golden_image_has_no_identity_and_the_import_enabled(fleet):
    assert not (fleet.layer / AGENT_DIR.lstrip("/") / "connection_string.txt").exists()
    wants = fleet.layer / "etc/systemd/system/multi-user.target.wants"
    assert (wants / IMPORT).is_symlink() and (wants / UNIT).is_symlink()
    assert "not configured" in fleet.build.stdout + fleet.build.stderr


def test_each_good_device_connects_as_its_own_identity(fleet, devices):
    for name in ("sas-1", "sas-2", "x509-1"):
        ct = devices[name]
        assert status_text(ct) == f"connected to {HUB} as {name}/{MODULE}", \
            journal(ct, "-u", IMPORT, "-u", VERIFY, "-u", UNIT)
        assert failed_units(ct) == []
        report = status_json(ct)
        assert report["identity"]["device"] == name
        assert report["origin"]["source"] == "credential"
        assert report["last_import"]["from"]["connection_string.txt"] == \
            f"/run/credentials/@system/{CS}"  # what nspawn --load-credential gave PID 1
        assert report["last_import"]["result"] == "verified"
        assert checks(ct)["last-import"]["status"] == "ok"
        assert agent_starts(ct) == 1  # the boot's start: the import queued no second one
        assert_no_secret(ct, *devices.secrets[name])
    clients = {c.client_id for c in fleet.hub.accepted()}
    assert {f"sas-1/{MODULE}", f"sas-2/{MODULE}"} <= clients
    assert f"as x509-1/{MODULE}" in fleet.mosquitto.log_text()
    assert status_json(devices["x509-1"])["method"] == "certificate"


def test_the_wrong_key_is_reported_and_the_device_stays_unconfigured(fleet, devices):
    ct = devices["wrong-1"]
    assert not ct.exists(f"{AGENT_DIR}/connection_string.txt")  # back to unconfigured
    assert failed_units(ct) == [VERIFY]  # the report systemd shows: exit 69
    log = journal(ct, "-u", IMPORT, "-u", VERIFY)
    assert "VERIFICATION FAILED" in log and "unconfigured, as before" in log, log
    assert ct.show(UNIT, "NRestarts")["NRestarts"] == "0"  # no crash loop
    last = status_json(ct)["last_import"]
    assert last["result"] == "rejected" and last["identity"]["device"] == "wrong-1"
    assert checks(ct)["last-import"]["status"] == "error"
    assert any(c.client_id == f"wrong-1/{MODULE}" and c.code == 5
               for c in fleet.hub.connections)
    assert_no_secret(ct, *devices.secrets["wrong-1"])


def test_a_refused_offer_is_not_imported_again_at_the_next_boot(fleet, devices):
    """The same refused offer at every boot was written, started, refused and rolled back each
    time (the verify unit failing at every boot): now the next boot writes and restarts
    nothing, says why, and check keeps the refusal an error."""
    ct = devices["wrong-1"]
    before = files_state(ct)
    tries = sum(c.client_id == f"wrong-1/{MODULE}" for c in fleet.hub.connections)
    ct.stop()
    ct.start(BOOT_TIMEOUT)
    log = journal(ct, "-u", IMPORT)
    assert "not imported again at boot" in log, log
    assert files_state(ct) == before  # nothing written, not even a record
    assert ct.show(UNIT, "ConditionResult")["ConditionResult"] == "no"  # never started
    assert ct.show(VERIFY, "ConditionResult")["ConditionResult"] == "no"
    assert failed_units(ct) == []
    assert sum(c.client_id == f"wrong-1/{MODULE}" for c in fleet.hub.connections) == tries
    last = checks(ct)["last-import"]
    assert last["status"] == "error" and "not imported again at boot" in last["message"]


def test_an_invalid_credential_is_one_journal_line_and_changes_nothing(devices):
    ct = devices["bad-1"]
    lines = journal(ct, "-u", IMPORT, "SYSLOG_IDENTIFIER=defender-setup-import").splitlines()
    errors = [line for line in lines if "credential defender-setup.connection-string" in line]
    assert len(errors) == 1, lines
    assert "SharedAccessKey: is not valid base64" in errors[0]
    assert "nothing was changed" in errors[0] and "not*base64" not in errors[0]
    assert failed_units(ct) == [IMPORT]
    assert ct.show(IMPORT, "ExecMainStatus")["ExecMainStatus"] == "65"
    assert not ct.exists(f"{AGENT_DIR}/connection_string.txt")
    assert ct.show(UNIT, "ConditionResult")["ConditionResult"] == "no"
    check = checks(ct)["last-import"]
    assert check["status"] == "error" and check["exit_code"] == 65


def test_no_credential_leaves_the_device_unconfigured_and_quiet(devices):
    ct = devices["blank"]
    assert failed_units(ct) == []
    assert ct.run(["systemctl", "is-system-running"], check=False).stdout.strip() == "running"
    assert ct.show(UNIT, "ConditionResult", "ActiveState") == {"ConditionResult": "no",
                                                               "ActiveState": "inactive"}
    assert "nothing offered" in journal(ct, "-u", IMPORT)
    assert ct.show(VERIFY, "ConditionResult")["ConditionResult"] == "no"
    assert not ct.exists(AGENT_DIR)  # not even our private state


def test_reboot_with_the_same_credential_writes_and_restarts_nothing(fleet, devices):
    ct = devices["sas-1"]
    before = files_state(ct)
    accepted = len(fleet.hub.accepted())
    ct.stop()
    ct.start(BOOT_TIMEOUT)
    assert "nothing written, nothing restarted" in journal(ct, "-u", IMPORT)
    assert files_state(ct) == before  # no credential, no record rewritten
    assert agent_starts(ct) == 1
    assert ct.show(VERIFY, "ConditionResult")["ConditionResult"] == "no"
    assert status_text(ct) == f"connected to {HUB} as sas-1/{MODULE}"
    assert len(fleet.hub.accepted()) == accepted + 1  # this boot's one connection


def test_reboot_with_a_new_credential_rekeys_the_device(fleet, devices):
    ct = devices["sas-2"]
    origin = status_json(ct)["origin"]
    ct.stop()
    ct.credentials = fleet.credentials(
        connection_string=sas_string("rekeyed-1", REGISTERED["rekeyed-1"]))
    ct.start(BOOT_TIMEOUT)
    assert status_text(ct) == f"connected to {HUB} as rekeyed-1/{MODULE}", \
        journal(ct, "-u", IMPORT, "-u", VERIFY)
    report = status_json(ct)
    assert report["previous_generation"] is True  # sas-2's set, for rollback
    assert report["last_import"]["result"] == "verified"
    assert report["origin"]["time"] >= origin["time"]
    assert agent_starts(ct) == 1 and failed_units(ct) == []
    assert REGISTERED["sas-2"] not in ct.read(f"{AGENT_DIR}/connection_string.txt")
    assert re.search(r"imported connection-string credentials for rekeyed-1/",
                     journal(ct, "-u", IMPORT))


def test_the_verify_unit_rolls_a_sealed_set_back(fleet):
    """The verify unit decrypts the sealed previous set to roll back to it: it must see what
    systemd-creds needs (the TPM2's /dev/tpmrm0 where there is one; none in a container)."""
    ct = fleet.device("sealed-1", fleet.credentials(
        connection_string=sas_string("sealed-1", REGISTERED["sealed-1"])))
    boot_all([ct])
    assert wait_for(lambda: status_text(ct) == f"connected to {HUB} as sealed-1/{MODULE}")
    ct.run(["defender-setup", "seal"])
    assert ct.exists(f"{AGENT_DIR}/connection_string.txt.cred")
    ct.stop()
    ct.credentials = fleet.credentials(connection_string=sas_string("sealed-1", key(98)))
    ct.start(BOOT_TIMEOUT)
    assert wait_for(lambda: ct.show(VERIFY, "ActiveState")["ActiveState"] != "activating"
                    and status_json(ct)["last_import"]["result"] != "written")
    log = journal(ct, "-u", IMPORT, "-u", VERIFY)
    assert "rolled back" in log and "does not decrypt" not in log, log
    assert "tpmrm" not in journal(ct)  # no complaint where there is no TPM2
    assert ct.show(VERIFY, "PrivateDevices", "DevicePolicy", "DeviceAllow") == {
        "PrivateDevices": "no", "DevicePolicy": "closed", "DeviceAllow": "char-tpmrm rw"}
    report = status_json(ct)
    assert report["sealing"]["sealed"] == ["connection_string.txt.cred"], report
    assert report["identity"]["device"] == "sealed-1" and report["warnings"] == []
    assert wait_for(lambda: status_text(ct) == f"connected to {HUB} as sealed-1/{MODULE}")
    assert_no_secret(ct, REGISTERED["sealed-1"], key(98))


# -- the other channels: credstore files, encrypted credstore, the boot partition's folder --


@pytest.fixture(scope="module")
def channels(fleet):
    found = {name: fleet.device(name) for name in ("store-1", "enc-1", "drop-1", "drop-bad")}
    put(found["store-1"].rootfs, f"/etc/credstore/{CS}",
        sas_string("cred-1", REGISTERED["cred-1"]))
    put(found["drop-1"].rootfs, "/boot/firmware/defender-setup/connection_string.txt",
        sas_string("drop-1", REGISTERED["drop-1"]) + "\r\n", mode=0o755, dir_mode=0o755)
    put(found["drop-bad"].rootfs, "/boot/defender-setup/connection_string.txt",
        x509_string("drop-bad"), mode=0o755, dir_mode=0o755)
    boot_all(list(found.values()))
    return found


def test_a_credstore_file_is_imported(channels):
    ct = channels["store-1"]
    assert status_text(ct) == f"connected to {HUB} as cred-1/{MODULE}", \
        journal(ct, "-u", IMPORT, "-u", VERIFY)
    assert status_json(ct)["last_import"]["from"] == {
        "connection_string.txt": f"/etc/credstore/{CS}"}
    assert failed_units(ct) == []




def encrypt(ct, device: str) -> None:
    ct.run(["sh", "-c", "mkdir -p -m 0700 /etc/credstore.encrypted && systemd-creds encrypt "
            f"--name={CS} - /etc/credstore.encrypted/{CS}"],
           input=sas_string(device, REGISTERED[device]))


def test_encrypted_credstore_and_running_the_import_again_later(channels):
    """A device configured after boot, then re-keyed while its agent runs, each time by
    'systemctl restart defender-setup-import': the import must not wait for the agent it is
    ordered before (that would hang until a timeout)."""
    ct = channels["enc-1"]
    assert ct.show(UNIT, "ConditionResult")["ConditionResult"] == "no"
    encrypt(ct, "enc-1")  # sealed with this machine's key: plain text never on its disk
    for device in ("enc-1", "enc-2"):
        if device == "enc-2":
            encrypt(ct, "enc-2")
        run = ct.run(["timeout", "60", "systemctl", "restart", IMPORT], check=False)
        assert run.returncode == 0, run.stderr + journal(ct, "-u", IMPORT)
        wanted = f"connected to {HUB} as {device}/{MODULE}"
        assert wait_for(lambda w=wanted: status_text(ct) == w and
                        ct.show(VERIFY, "ActiveState")["ActiveState"] == "inactive"), \
            journal(ct, "-u", IMPORT, "-u", VERIFY, "-u", UNIT)
        last = status_json(ct)["last_import"]
        assert last["result"] == "verified" and last["identity"]["device"] == device, last
    assert failed_units(ct) == []
    assert_no_secret(ct, REGISTERED["enc-1"], REGISTERED["enc-2"])


def test_the_drop_folder_is_imported_then_emptied(channels):
    ct = channels["drop-1"]
    assert status_text(ct) == f"connected to {HUB} as drop-1/{MODULE}", \
        journal(ct, "-u", IMPORT, "-u", VERIFY)
    assert ct.run(["ls", "-A", "/boot/firmware/defender-setup"]).stdout == ""
    assert status_json(ct)["origin"]["source"] == "drop-folder"


def test_a_refused_drop_folder_stays_with_the_reason_beside_it(channels):
    ct = channels["drop-bad"]
    folder = "/boot/defender-setup"
    note = ct.read(f"{folder}/defender-setup.rejected.txt")
    assert f"{folder}/certificate_public.pem: is missing" in note, note
    assert ct.exists(f"{folder}/connection_string.txt")
    assert not ct.exists(f"{AGENT_DIR}/connection_string.txt")
    assert failed_units(ct) == [IMPORT]


@pytest.mark.parametrize("suite", ["bullseye", "trixie"])
def test_the_import_on_debian_11_and_13(suite, boot):
    """systemd 247 and 257: the units load without complaint, an unconfigured install is quiet,
    and a credstore file is imported by the unit and verified (the hub is not reachable here:
    the agent runs and retries, which is a healthy verdict)."""
    import harness

    ct = boot(harness.base_image(suite=suite))
    ct.install_deb()
    assert failed_units(ct) == []
    ct.copy_in(sas_string("old-1", key(31)), f"/etc/credstore/{CS}")
    run = ct.run(["timeout", "60", "systemctl", "restart", IMPORT], check=False)
    assert run.returncode == 0, run.stderr + journal(ct, "-u", IMPORT)
    assert wait_for(lambda: ct.show(VERIFY, "ActiveState")["ActiveState"] == "inactive" and
                    (status_json(ct).get("last_import") or {}).get("result") == "verified"), \
        journal(ct, "-u", IMPORT, "-u", VERIFY, "-u", UNIT)
    assert failed_units(ct) == []
    log = journal(ct)
    for noise in ("Invalid syntax", "inherited credential", "Unknown key", "Traceback",
                  "tpmrm"):
        assert noise not in log, noise
