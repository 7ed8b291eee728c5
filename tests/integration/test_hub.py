"""The booted system's agent against a real hub: the package's own runtime, no test connector.

The hub (tests/hubsim: an MQTT broker that verifies SAS tokens against the device key) runs in
this test process on the host's 127.0.0.1; the container shares the host network (nspawn
without --private-network), so the agent reaches it at GatewayHostName=127.0.0.1 while its
identity stays on HostName. conf.json points at the test CA and the hub's port.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from defender_setup import __version__
from tests.hubsim.broker import Broker
from tests.hubsim.pki import Pki
from tests.hubsim.sasauth import SasAuth

UNIT = "defender-iot-micro-agent.service"
AGENT_DIR = "/var/defender_iot_micro_agent"
CONF_DIR = "/etc/defender_iot_micro_agent"
MODULE = "DefenderIotMicroAgent"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("hub-pki"))


@pytest.fixture
def ct(boot, base):
    return boot(base, prefix="hub")


def connection_string(preseed, device: str, key: str) -> str:
    return (f"HostName={preseed.HUB};DeviceId={device};ModuleId={MODULE};"
            f"SharedAccessKey={key};GatewayHostName=127.0.0.1")


@pytest.fixture
def hub(pki, preseed):
    """The hub knows good-dev (key 1) and bad-dev (key 2); anything else is refused."""
    auth = SasAuth(preseed.HUB, {("good-dev", MODULE): preseed.sas_key(1),
                                 ("bad-dev", MODULE): preseed.sas_key(2)})
    broker = Broker(auth=auth, tls=(pki.server_cert, pki.server_key))
    broker.start()
    yield broker
    broker.stop()


def point_at_hub(ct, pki, hub, **settings):
    ct.copy_in(pki.ca_file, f"{CONF_DIR}/hub-ca.pem", mode=0o644)
    ct.copy_in(json.dumps({"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": hub.port,
                           "heartbeat_interval": 5, **settings}), f"{CONF_DIR}/conf.json",
               mode=0o644)


def status(ct) -> dict:
    return ct.show(UNIT, "ActiveState", "SubState", "StatusText", "ExecMainStatus", "MainPID")


def test_agent_connects_to_the_hub_and_sends_heartbeats(ct, pki, hub, preseed):
    point_at_hub(ct, pki, hub, twin_interval=1)
    text = connection_string(preseed, "good-dev", preseed.sas_key(1))
    r = ct.install_deb(preseed=preseed.for_connection_string(text))
    out = r.stdout + r.stderr
    assert re.search(rf"{UNIT}: active \(running\), stable for .*status: connected to "
                     rf"{re.escape(preseed.HUB)} as good-dev/{MODULE}", out), out
    s = status(ct)
    assert s["StatusText"] == f"connected to {preseed.HUB} as good-dev/{MODULE}", s
    conn = hub.accepted()[-1]
    assert conn.client_id == f"good-dev/{MODULE}"
    assert conn.username.startswith(f"{preseed.HUB}/good-dev/{MODULE}/?api-version=")
    assert hub.wait_for(lambda: len(hub.messages) >= 2, 15)  # on connect, then every 5 s
    beat = json.loads(hub.messages[-1][2])
    assert beat["type"] == "heartbeat" and beat["osRelease"].startswith("Debian GNU/Linux")
    log = ct.run(["journalctl", "-u", UNIT, "-o", "cat"]).stdout
    assert f"connected to {preseed.HUB} as good-dev/{MODULE} via 127.0.0.1:{hub.port}" in log
    key = preseed.sas_key(1)
    assert key not in out and key not in log and "Traceback" not in log
    # the status command shows the hub state too
    assert "connected to" in ct.run(["defender-setup", "status"]).stdout
    # the module twin: reported by the sandboxed agent, with what the package's own writers
    # recorded (the debconf answers, then the trigger's verdict, reached after the start)
    def reported():
        return hub.reported.get(("good-dev", MODULE), {}).get("defenderSetup", {})

    assert hub.wait_for(lambda: reported().get("lastVerification"), 15), hub.twin_patches
    props = reported()
    assert (props["origin"], props["method"]) == ("debconf", "connection-string"), props
    assert props["lastChange"]["result"] == "verified", props
    assert re.fullmatch(re.escape(__version__) + r"-\d+", props["packageVersion"]), props
    assert props["osRelease"]["id"] == "debian" and props["sealed"] is False, props
    assert all(key.encode() not in payload for *_, payload, _ in hub.twin_patches)


def test_rejected_key_rolls_back_to_the_connected_set(ct, pki, hub, preseed):
    point_at_hub(ct, pki, hub, twin_interval=1)
    good = connection_string(preseed, "good-dev", preseed.sas_key(1))
    ct.install_deb(preseed=preseed.for_connection_string(good))
    assert status(ct)["StatusText"].startswith("connected to"), status(ct)
    accepted_before = len(hub.accepted())

    wrong = connection_string(preseed, "good-dev", preseed.sas_key(7))  # a key the hub refuses
    # without the pre-flight probe, which would refuse it before writing (test_hubcheck.py)
    ct.preseed(preseed.for_connection_string(wrong) + [preseed.line("probe-hub", "boolean",
                                                                    "false")])
    r = ct.run(["dpkg-reconfigure", "-fnoninteractive", "defender-setup"], check=False,
               env={"DEBIAN_FRONTEND": "noninteractive"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out  # dpkg-reconfigure stays usable
    assert "VERIFICATION FAILED" in out
    assert "not authorized (CONNACK 5)" in out and "wrong SharedAccessKey" in out, out
    assert "status=76" in out
    assert "rolled back to the previous credentials" in out
    # the previous, accepted key is back on disk and connected again
    on_disk = ct.read(f"{AGENT_DIR}/connection_string.txt")
    assert f"SharedAccessKey={preseed.sas_key(1)}" in on_disk
    assert hub.wait_for(lambda: len(hub.accepted()) > accepted_before, 15)
    s = status(ct)
    assert s["SubState"] == "running" and s["StatusText"].startswith("connected to"), s
    assert preseed.sas_key(7) not in out
    # the fleet sees it in the twin: the last change was rolled back, the roll-back runs
    def change():
        return hub.reported.get(("good-dev", MODULE), {}).get("defenderSetup", {}).get(
            "lastChange") or {}

    assert hub.wait_for(lambda: change().get("result") == "rolled-back", 15), hub.reported
    props = hub.reported[("good-dev", MODULE)]["defenderSetup"]
    assert (props["origin"], change()["origin"]) == ("rollback", "debconf"), props


def test_unreachable_hub_is_active_and_says_why(ct, pki, preseed):
    from tests.hubsim.mosquitto import free_port

    port = free_port()  # nothing listens there
    ct.copy_in(pki.ca_file, f"{CONF_DIR}/hub-ca.pem", mode=0o644)
    ct.copy_in(json.dumps({"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": port}),
               f"{CONF_DIR}/conf.json", mode=0o644)
    text = connection_string(preseed, "good-dev", preseed.sas_key(1))
    r = ct.install_deb(preseed=preseed.for_connection_string(text))
    out = r.stdout + r.stderr
    assert "VERIFICATION FAILED" not in out, out
    s = status(ct)
    assert s["SubState"] == "running"
    assert s["StatusText"] == ("retrying: hub unreachable (TCP: connection refused by "
                               f"127.0.0.1:{port})"), s


def test_broken_conf_json_is_one_line_and_no_crash_loop(ct, pki, preseed):
    ct.copy_in('{"transport": "tcp"}', f"{CONF_DIR}/conf.json", mode=0o644)
    text = connection_string(preseed, "good-dev", preseed.sas_key(1))
    # the package's verification reports the failure (its exit status is its own business)
    r = ct.install_deb(preseed=preseed.for_connection_string(text), check=False)
    out = r.stdout + r.stderr
    assert 'transport: must be "mqtt" or "websocket", got "tcp"' in out, out
    assert "status=78" in out and "Traceback" not in out
    s = ct.show(UNIT, "ExecMainStatus", "NRestarts")
    assert s["ExecMainStatus"] == "78" and s["NRestarts"] == "0", s


# -- the hub code on every target release's paho and Python -------------------------------
# Debian 11 ships paho-mqtt 1.5.1 (Python 3.9), 12 ships 1.6.1 (3.11), 13 ships 2.1.0 (3.13,
# CallbackAPIVersion). The hub tests run inside a minimal image of each release (cached next
# to the harness's images), against that release's own mosquitto, openssl and paho.

RELEASE_PACKAGES = ("python3-paho-mqtt", "python3-pytest", "python3-cryptography",
                    "python3-hypothesis", "python3-systemd", "mosquitto", "openssl")
def hub_test_files() -> list[str]:
    """The files of the agent's own tests (marked ``hub``), collected here on the host: the
    other release's container then collects only those."""
    import subprocess

    import harness

    r = subprocess.run(["/usr/bin/python3", "-m", "pytest", "--collect-only", "-q", "-m", "hub",
                        "-p", "no:cacheprovider", "tests/unit", "tests/functional"],
                       cwd=harness.REPO, capture_output=True, text=True, timeout=300)
    files = sorted({line.split("::")[0] for line in r.stdout.splitlines() if "::" in line})
    assert r.returncode == 0 and files, r.stdout[-2000:] + r.stderr[-2000:]
    return files


def release_image(suite: str):
    import hashlib
    import shutil
    import subprocess
    import tempfile

    import harness

    key = hashlib.sha256(f"{suite} {' '.join(RELEASE_PACKAGES)}".encode()).hexdigest()[:12]
    path = harness.CACHE / f"hub-{suite}-{key}"
    with harness._lock(path.name):
        if not (path / "etc" / "os-release").exists():
            tmp = tempfile.mkdtemp(prefix=path.name + ".", dir=harness.CACHE)
            shutil.rmtree(tmp)  # mmdebstrap wants to create it
            subprocess.run(["mmdebstrap", "--variant=apt", "--quiet",
                            "--include=" + ",".join(RELEASE_PACKAGES), suite, tmp],
                           check=True, capture_output=True, timeout=1800)
            Path(tmp).rename(path)
    return path


@pytest.mark.parametrize("suite", ["bullseye", "trixie"])
def test_hub_tests_pass_on_other_releases(suite, tmp_path):
    import subprocess
    import uuid

    import harness

    image = release_image(suite)
    r = subprocess.run(
        ["systemd-nspawn", "--register=no", "--keep-unit", "-q",
         "-M", f"hub-{suite}-{uuid.uuid4().hex[:6]}", "-D", str(image), "--volatile=overlay",
         "--bind-ro=/etc/hosts", f"--bind-ro={harness.REPO}:/src", "--chdir=/src",
         "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1",
         "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", *hub_test_files()],
        capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_certificate_identity_connects_to_mosquitto(ct, preseed, tmp_path):
    # X.509 through the package's certificate questions; the hub is Debian's mosquitto
    # requiring client certificates from the test CA. /etc/hosts in the container maps the
    # hub's name to the host's loopback, so TLS checks the real HostName.
    from tests.hubsim.mosquitto import Mosquitto

    pki = Pki(tmp_path / "pki", names=("localhost", preseed.HUB))
    cert, key = pki.client(f"dev1/{MODULE}")
    with Mosquitto(pki, tmp_path) as mosq:
        ct.sh(f"echo '127.0.0.1 {preseed.HUB}' >> /etc/hosts")
        ct.copy_in(pki.ca_file, f"{CONF_DIR}/hub-ca.pem", mode=0o644)
        # Microsoft's transport key: one conf.json serves its agent and ours, handed over by
        # the installed unit like our own keys
        ct.copy_in(json.dumps({"ca_file": f"{CONF_DIR}/hub-ca.pem", "port": mosq.port,
                               "IothubModule_TransportProtocol": "MQTT_Protocol"}),
                   f"{CONF_DIR}/conf.json", mode=0o644)
        ct.copy_in(cert, "/root/device.pem")
        ct.copy_in(key, "/root/device.key")
        r = ct.install_deb(preseed=preseed.for_certificate())
        out = r.stdout + r.stderr
        s = status(ct)
        assert s["StatusText"] == f"connected to {preseed.HUB} as dev1/{MODULE}", out + str(s)
        assert f"as dev1/{MODULE}" in mosq.log_text()
        assert "BEGIN" not in ct.run(["journalctl", "-u", UNIT, "-o", "cat"]).stdout


# -- a hostile hub against the installed unit: its limits hold and it stops in time ----------
# The container's cgroup controllers are read-only here (nspawn on a cgroup v1 host), so the
# unit's MemoryMax= is checked as configured, and what it has to cover is measured directly:
# the agent's peak resident memory (VmHWM) and the kernel's buffers of its hub socket (seen
# from the host: the container shares its network).

def socket_memory(port: int) -> int:
    """Bytes the kernel holds for the agent's connection to ``port`` (receive + send queue)."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-tmnH", "dst", f"127.0.0.1:{port}"], capture_output=True,
                         text=True, check=True).stdout
    found = re.findall(r"skmem:\(r(\d+),rb\d+,t(\d+),tb\d+,f\d+,w(\d+)", out)
    return sum(int(r) + int(w) for r, _, w in found)


def vm(ct, pid: str, field: str) -> int:
    return int(ct.sh(f"grep {field}: /proc/{pid}/status").stdout.split()[1]) * 1024


@pytest.mark.parametrize("mode", ["huge", "flood"])
def test_installed_agent_against_a_hostile_hub_stays_bounded_and_stops(ct, pki, preseed, mode):
    import time

    from tests.hubsim.hostile import HostileHub

    hostile = HostileHub(mode, tls=(pki.server_cert, pki.server_key))
    hostile.start()
    try:
        point_at_hub(ct, pki, hostile)
        text = connection_string(preseed, "good-dev", preseed.sas_key(1))
        r = ct.install_deb(preseed=preseed.for_connection_string(text))
        out = r.stdout + r.stderr
        assert "VERIFICATION FAILED" not in out, out
        pid = ct.show(UNIT, "MainPID")["MainPID"]
        sockets = 0
        deadline = time.monotonic() + (30 if mode == "flood" else 5)
        while time.monotonic() < deadline:  # the flood is cut off after about 16 s
            sockets = max(sockets, socket_memory(hostile.port))
            time.sleep(0.5)
        peak = vm(ct, pid, "VmHWM")
        log = ct.run(["journalctl", "-u", UNIT, "-o", "cat"]).stdout
        s = ct.show(UNIT, "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID",
                    "MemoryMax", "MemoryHigh", "TasksMax")
        before = time.monotonic()
        ct.run(["systemctl", "stop", UNIT])
        took = time.monotonic() - before
    finally:
        hostile.stop()
    print(f"\n{mode}: {s['StatusText']}; agent VmHWM {peak / 2**20:.1f} MiB, socket buffers "
          f"up to {sockets / 2**20:.1f} MiB; 'systemctl stop' {took:.2f} s; hub sent "
          f"{hostile.sent / 1e6:.1f} MB")
    assert (s["ActiveState"], s["SubState"], s["NRestarts"]) == ("active", "running", "0"), s
    assert s["MainPID"] == pid  # never restarted
    reason = {"huge": "MQTT: packet too large from", "flood": "MQTT: flood from"}[mode]
    assert f"hub unreachable ({reason}" in log, log  # once per distinct reason
    assert (s["MemoryHigh"], s["MemoryMax"], s["TasksMax"]) == (
        str(64 * 2**20), str(96 * 2**20), "16"), s
    assert peak + sockets < 64 * 2**20  # inside MemoryHigh, let alone MemoryMax
    assert took < 3.0  # the agent itself ends within 2 s of SIGTERM; systemctl adds its own
    stopped = ct.show(UNIT, "Result", "ExecMainStatus")
    assert (stopped["Result"], stopped["ExecMainStatus"]) == ("success", "0"), stopped
