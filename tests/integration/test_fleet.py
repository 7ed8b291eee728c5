"""One golden image, many devices: each device gets its own identity when it boots.

ONE image is built the way image pipelines build theirs (mmdebstrap installs the .deb in a
chroot, no answers at all); it holds only image-wide settings (conf.json trusting the two
test CAs, the hubs' port). Every device boots its own copy-on-write copy of it
(harness.device_disk: survives a reboot, thrown away at the end) and is given its own systemd
credentials with ``systemd-nspawn --load-credential`` (from files: never a value on a
command line). The devices boot in parallel.

The hubs run on the host, whose network the containers share: tests.hubsim (SAS tokens
verified against each device's key) on 127.0.0.1, Debian's mosquitto requiring client
certificates from its test CA on 127.0.0.2, both on the same port, so one conf.json serves
both; each connection string's GatewayHostName says which one a device talks to.
"""

from __future__ import annotations

import base64
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import harness
import pytest

from tests.hubsim.broker import Broker
from tests.hubsim.mosquitto import Mosquitto
from tests.hubsim.pki import Pki
from tests.hubsim.sasauth import SasAuth

HUB = "fleet-hub.azure-devices.net"
MODULE = "DefenderIotMicroAgent"
UNIT = "defender-iot-micro-agent.service"
IMPORT = "defender-setup-import.service"
VERIFY = "defender-setup-import-verify.service"
AGENT_DIR = "/var/defender_iot_micro_agent"
CONF_DIR = "/etc/defender_iot_micro_agent"
CS = "defender-setup.connection-string"


def key(seed: int) -> str:
    return base64.b64encode(bytes((seed * 7 + i) % 256 for i in range(32))).decode()


# The hub's registry: device -> key. "wrong-1" exists, but its device is offered another key.
REGISTERED = {"sas-1": key(1), "sas-2": key(2), "wrong-1": key(3), "rekeyed-1": key(4),
              "cred-1": key(5), "enc-1": key(6), "drop-1": key(7)}


def sas_string(device: str, secret: str) -> str:
    return (f"HostName={HUB};DeviceId={device};ModuleId={MODULE};SharedAccessKey={secret};"
            "GatewayHostName=127.0.0.1")


def x509_string(device: str) -> str:
    return f"HostName={HUB};DeviceId={device};ModuleId={MODULE};x509=true;" \
        "GatewayHostName=127.0.0.2"


class Fleet:
    """The hubs, the golden image and a private directory for credential files."""

    def __init__(self, stack: ExitStack, deb: Path, work: Path):
        self.work = work
        work.chmod(0o700)
        self.sas_pki = Pki(work / "sas-pki", names=("localhost", HUB))
        self.x509_pki = Pki(work / "x509-pki", names=("localhost", HUB), seed=1,
                            ips=("127.0.0.2",))
        self.hub = Broker(auth=SasAuth(HUB, {(d, MODULE): k for d, k in REGISTERED.items()}),
                          tls=(self.sas_pki.server_cert, self.sas_pki.server_key))
        self.port = self.hub.start()
        stack.callback(self.hub.stop)
        self.mosquitto = stack.enter_context(
            Mosquitto(self.x509_pki, work, port=self.port, host="127.0.0.2"))
        # The golden image: the cached base image plus a layer with the package installed
        # by dpkg with no systemd running and no answers, as an image build does.
        self.layer = harness.CACHE / "devices" / f"golden-{os.getpid()}-{work.name}"
        stack.callback(lambda: harness.shutil.rmtree(self.layer, ignore_errors=True))
        self.build = harness.install_layer(harness.base_image(), deb, self.layer)
        assert self.build.returncode == 0, self.build.stderr[-3000:]
        self.image = [self.layer, harness.base_image()]
        conf = self.layer / CONF_DIR.lstrip("/")
        conf.mkdir(parents=True, exist_ok=True)
        ca = self.sas_pki.ca_file.read_bytes() + self.x509_pki.ca_file.read_bytes()
        (conf / "hub-ca.pem").write_bytes(ca)
        (conf / "conf.json").write_text(json.dumps(
            {"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": self.port, "heartbeat_interval": 5}))
        self.stack = stack
        self._n = 0

    def credentials(self, **values) -> dict:
        """``{credential id: host file}``; values are bytes or str, written 0600."""
        self._n += 1
        directory = self.work / f"creds-{self._n}"
        directory.mkdir(mode=0o700)
        files = {}
        for name, value in values.items():
            cid = "defender-setup." + name.replace("_", "-")
            path = directory / cid
            path.write_bytes(value if isinstance(value, bytes) else value.encode())
            path.chmod(0o600)
            files[cid] = str(path)
        return files

    def device(self, name: str, credentials: dict | None = None) -> harness.Container:
        """A device: its own disk from the golden image, not started yet."""
        disk = self.stack.enter_context(harness.device_disk(self.image, name))
        container = harness.Container(disk, name=f"fleet-{name}-{os.getpid() % 10000}",
                                      volatile=False, credentials=credentials or {})
        self.stack.callback(container.stop)
        return container


@pytest.fixture(scope="module")
def fleet(deb, tmp_path_factory):
    with ExitStack() as stack:
        yield Fleet(stack, deb, tmp_path_factory.mktemp("fleet"))


def boot_all(containers) -> None:
    with ThreadPoolExecutor(max_workers=len(containers)) as pool:
        for future in [pool.submit(c.start) for c in containers]:
            future.result()


def status_text(ct) -> str:
    return ct.show(UNIT, "StatusText")["StatusText"]


class Failed(list):
    """The failed units, with their status in the repr (what a failed assertion shows)."""

    def __init__(self, ct, names):
        super().__init__(names)
        self.detail = ct.run(["systemctl", "status", "--no-pager", "-l", *names],
                             check=False).stdout if names else ""

    def __repr__(self):
        return f"{list(self)!r}\n{self.detail}"


def failed_units(ct) -> list[str]:
    out = ct.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout
    return Failed(ct, [line.split()[0] for line in out.splitlines() if line.strip()])


def status_json(ct) -> dict:
    return json.loads(ct.run(["defender-setup", "status", "--json"]).stdout)


def checks(ct) -> dict:
    out = ct.run(["defender-setup", "check", "--json"], check=False).stdout
    return {c["id"]: c for c in json.loads(out)}


def journal(ct, *args) -> str:
    return ct.run(["journalctl", "-b", "--no-pager", "-o", "cat", *args]).stdout


def agent_starts(ct) -> int:
    """Starts of the agent's unit in this boot (systemd's "Started" message per start)."""
    out = ct.run(["journalctl", "-b", "--no-pager", "-o", "cat", f"UNIT={UNIT}",
                  "MESSAGE_ID=39f53479d3a045ac8e11786248231fbf"]).stdout
    return len(out.splitlines())


def files_state(ct) -> str:
    """Inode, size and mtime of every file in the agent directory: did anything get written?"""
    return ct.run(["sh", "-c", f"find {AGENT_DIR} -type f -printf '%p %i %s %T@\\n' | sort"]
                  ).stdout


def assert_no_secret(ct, *secrets) -> None:
    text = journal(ct) + ct.run(["defender-setup", "status", "--json"]).stdout
    for secret in secrets:
        assert secret not in text
    assert "PRIVATE KEY" not in text


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
    ct.start()
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
    ct.start()
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
