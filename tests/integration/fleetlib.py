"""What the fleet tests share: the test hubs, one golden image, devices made from it, and
the questions asked of a booted device.

Interface::

    with running(deb, work, registered={device: key}, extra=()) as fleet:   # hubs + image
        fleet.credentials(connection_string=..., certificate=..., private_key=...) -> {id: file}
        fleet.device(name, credentials) -> harness.Container (its own disk, not started)
    boot_all(containers); status_text(ct); failed_units(ct); status_json(ct); checks(ct)
    journal(ct, *journalctl args); agent_starts(ct); files_state(ct); assert_no_secret(ct, ...)
    put(disk, guest path, text); wait_for(predicate, timeout)

The golden image is the cached base image (``extra`` packages added) plus a layer where dpkg
installed the .deb with no systemd running and no answers, as an image build does; it holds
only image-wide settings (conf.json trusting the two test CAs, the hubs' port). Every device
boots its own copy-on-write disk of it (harness.device_disk: survives a reboot, thrown away at
the end) and is given its own systemd credentials with ``--load-credential`` (from files:
never a value on a command line).

The hubs run on the host, whose network the containers share: tests.hubsim (SAS tokens
verified against each registered device's key) on 127.0.0.1 and Debian's mosquitto requiring
client certificates from its test CA on 127.0.0.2, both on the same port, so one conf.json
serves both; each connection string's GatewayHostName says which one a device talks to.
"""

from __future__ import annotations

import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import harness

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


def sas_string(device: str, secret: str) -> str:
    return (f"HostName={HUB};DeviceId={device};ModuleId={MODULE};SharedAccessKey={secret};"
            "GatewayHostName=127.0.0.1")


def x509_string(device: str) -> str:
    return f"HostName={HUB};DeviceId={device};ModuleId={MODULE};x509=true;" \
        "GatewayHostName=127.0.0.2"


class Fleet:
    """The hubs, the golden image and a private directory for credential files."""

    def __init__(self, stack: ExitStack, deb: Path, work: Path, registered: dict,
                 extra: tuple[str, ...] = ()):
        self.work = work
        work.chmod(0o700)
        self.sas_pki = Pki(work / "sas-pki", names=("localhost", HUB))
        self.x509_pki = Pki(work / "x509-pki", names=("localhost", HUB), seed=1,
                            ips=("127.0.0.2",))
        self.hub = Broker(auth=SasAuth(HUB, {(d, MODULE): k for d, k in registered.items()}),
                          tls=(self.sas_pki.server_cert, self.sas_pki.server_key))
        self.port = self.hub.start()
        stack.callback(self.hub.stop)
        self.mosquitto = stack.enter_context(
            Mosquitto(self.x509_pki, work, port=self.port, host="127.0.0.2"))
        # The golden image: the cached base image plus a layer with the package installed
        # by dpkg with no systemd running and no answers, as an image build does.
        self.layer = harness.CACHE / "devices" / f"golden-{os.getpid()}-{work.name}"
        stack.callback(lambda: harness.shutil.rmtree(self.layer, ignore_errors=True))
        base = harness.base_image(extra=extra)
        self.build = harness.install_layer(base, deb, self.layer)
        assert self.build.returncode == 0, self.build.stderr[-3000:]
        self.image = [self.layer, base]
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



@contextmanager
def running(deb: Path, work: Path, registered: dict, extra: tuple[str, ...] = ()):
    """A :class:`Fleet` for the length of a ``with`` block (a module fixture's life)."""
    with ExitStack() as stack:
        yield Fleet(stack, deb, work, registered, extra)


BOOT_TIMEOUT = 240  # s; six devices booting at once on a 2-core machine others share too


def boot_all(containers) -> None:
    """Start the devices in parallel; each boot (import and verification included) is bounded."""
    with ThreadPoolExecutor(max_workers=len(containers)) as pool:
        for future in [pool.submit(c.start, BOOT_TIMEOUT) for c in containers]:
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
    return {c["id"]: c for c in json.loads(out)["checks"]}


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


def put(disk: Path, guest: str, data: str, mode: int = 0o600, dir_mode: int = 0o700) -> None:
    """A file in a device's disk before its first boot (what an image tool or a person with
    the SD card in a PC does)."""
    path = disk / guest.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(dir_mode)
    path.write_text(data)
    path.chmod(mode)


def wait_for(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
