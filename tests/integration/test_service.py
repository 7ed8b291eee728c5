"""The unit, the agent runtime and ``defender-setup restart`` under real systemd.

Each test boots the cached base image (volatile overlay) with the built .deb installed from
preseeded answers (harness.py / conftest.py). Failures must be deterministic, so the tests that
need an agent that fails with credentials that *validate* install a test-only "hub" through a
unit drop-in: the real runtime (``defender_setup.agent.runtime.Runtime``) with a connector
that behaves like IoT Hub answering CONNACK "not authorized" (exit 76) for the device ids in
/etc/defender-setup-test/reject-devices -- the common real failure: a well-formed connection
string whose key or device the hub does not accept -- or that crashes half a second after
READY (exit 1, a crash loop under Restart=on-failure) for those in crash-devices. Nothing of
this is in the package: it uses the runtime's connector seam only.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.waiting import wait_for

UNIT = "defender-iot-micro-agent.service"
AGENT_DIR = "/var/defender_iot_micro_agent"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.d"

TEST_HUB = '''\
"""Test-only agent: the real runtime with a connector acting as a hub (see the test module)."""
import os
import sys
import threading
from pathlib import Path

from defender_setup.agent.runtime import Runtime

CONF = Path("/etc/defender-setup-test")


def devices(name):
    path = CONF / name
    return set(path.read_text().split()) if path.exists() else set()


class TestHub:
    def start(self, creds, notify):
        device = creds.connection_string.device_id
        if device in devices("reject-devices"):
            notify.fail(76, f"hub rejected {device}: CONNACK not authorized (test hub)")
            return
        if device in devices("crash-devices"):
            threading.Timer(0.5, os._exit, (1,)).start()
        notify.status(f"connected to test hub as {device}")

    def stop(self):
        pass


sys.exit(Runtime(Path("/"), connector=TestHub()).run())
'''


@pytest.fixture
def ct(boot, base):
    return boot(base, prefix="svc")


def install(ct, preseed, device="good-dev", strict=False):
    text = preseed.connection_string(device=device)
    r = ct.install_deb(preseed=preseed.for_connection_string(text, strict=strict))
    return r.stdout + r.stderr, text


def install_test_hub(ct, reject=(), crash=(), restart_sec=None):
    ct.copy_in(TEST_HUB, "/usr/local/lib/defender-setup-test/agent.py", mode=0o644)
    ct.copy_in("".join(f"{d}\n" for d in reject), "/etc/defender-setup-test/reject-devices",
               mode=0o644)
    ct.copy_in("".join(f"{d}\n" for d in crash), "/etc/defender-setup-test/crash-devices",
               mode=0o644)
    dropin = ("[Service]\nExecStart=\n"
              "ExecStart=/usr/bin/python3 -I /usr/local/lib/defender-setup-test/agent.py\n")
    if restart_sec:
        dropin += f"RestartSec={restart_sec}\n"
    ct.copy_in(dropin, f"{DROPIN_DIR}/test-hub.conf", mode=0o644)
    ct.run(["systemctl", "daemon-reload"])


def reconfigure(ct, preseed, device, strict=False):
    """dpkg-reconfigure to a new device's connection string; returns (result, output)."""
    text = preseed.connection_string(device=device, key=preseed.sas_key(len(device)))
    ct.preseed(preseed.for_connection_string(text, strict=strict))
    r = ct.run(["dpkg-reconfigure", "-fnoninteractive", "defender-setup"], check=False,
               env={"DEBIAN_FRONTEND": "noninteractive"})
    return r, r.stdout + r.stderr, text


def state(ct):
    return ct.show(UNIT, "InvocationID", "MainPID", "NRestarts", "ActiveState", "SubState",
                   "StatusText", "ExecMainStatus", "Result", "ConditionResult")


def settled(ct):
    """The unit's state once systemd is done with it (not starting, stopping or waiting to
    restart), else None."""
    s = state(ct)
    return s if s["ActiveState"] not in ("activating", "deactivating", "reloading") else None


def cursor(ct):
    return ct.run(["journalctl", "-n0", "--show-cursor", "-q"]).stdout.split("cursor: ")[1].strip()


def new_invocations(ct, since, running):
    """Invocations of the unit that started after the journal cursor ``since``."""
    out = ct.run(["journalctl", "-u", UNIT, "--after-cursor", since, "-o", "json"]).stdout
    ids = {json.loads(line).get("_SYSTEMD_INVOCATION_ID") or json.loads(line).get(
        "INVOCATION_ID") for line in out.splitlines()}
    return ids - {None, running}


def connection_string_on_disk(ct):
    return ct.read(f"{AGENT_DIR}/connection_string.txt")


def exposure(ct) -> tuple[float, str]:
    """The unit's ``systemd-analyze security`` exposure level, and the whole report."""
    text = ct.run(["systemd-analyze", "security", UNIT, "--no-pager"]).stdout
    return float(re.search(r"Overall exposure level for \S+: (\d+\.\d)", text).group(1)), text


def test_installed_service_is_active_verified_and_hardened(ct, preseed):
    out, text = install(ct, preseed)
    assert re.search(rf"{UNIT}: active \(running\), stable for \d\.\d s", out), out
    s = state(ct)
    assert (s["ActiveState"], s["SubState"]) == ("active", "running")
    # the hub connector's status: no hub is reachable from here, which is not a failure
    assert s["StatusText"].startswith(("connected", "retrying: hub unreachable")), s
    # every hardening directive is accepted inside the container and the agent still runs
    level, report = exposure(ct)
    assert level <= 1.5, report
    # reload: same process, credentials re-read, still ready
    ct.run(["systemctl", "reload", UNIT])
    after = state(ct)
    assert after["MainPID"] == s["MainPID"] and after["SubState"] == "running"
    log = ct.run(["journalctl", "-u", UNIT, "-o", "cat"]).stdout
    assert "reload: credentials re-read" in log
    # the metrics timer is enabled and running; once node_exporter's directory exists, its
    # service (what the timer starts, hardened) writes the file node_exporter reads
    timer = ct.show("defender-setup-metrics.timer", "UnitFileState", "ActiveState")
    assert (timer["UnitFileState"], timer["ActiveState"]) == ("enabled", "active"), timer
    ct.run(["mkdir", "-p", "/var/lib/prometheus/node-exporter"])
    ct.run(["systemctl", "start", "defender-setup-metrics.service"])
    prom = "/var/lib/prometheus/node-exporter/defender_setup.prom"
    assert ct.run(["stat", "-c", "%a %U", prom]).stdout.split() == ["644", "root"]
    samples = ct.read(prom)
    assert "defender_setup_configured 1\n" in samples
    assert "defender_setup_agent_active 1\n" in samples
    assert 'check="service-active",status="ok"} 1' in samples and "hub-auth" not in samples
    # SIGTERM: a clean exit 0
    ct.run(["systemctl", "stop", UNIT])
    stopped = state(ct)
    assert (stopped["Result"], stopped["ExecMainStatus"]) == ("success", "0")
    key = text.split("SharedAccessKey=")[1]
    assert key not in out and key not in log


def test_restart_is_exactly_one_restart(ct, preseed):
    install(ct, preseed)
    before, mark = state(ct), cursor(ct)
    r = ct.run(["defender-setup", "restart"])
    assert re.fullmatch(rf"{UNIT}: active \(running\), stable for \d\.\d s, status: .+\n",
                        r.stdout), r.stdout
    after = state(ct)
    assert after["InvocationID"] != before["InvocationID"]
    assert new_invocations(ct, mark, before["InvocationID"]) == {after["InvocationID"]}
    # and through dpkg-reconfigure (the postinst trigger): one restart, the verdict printed
    before, mark = after, cursor(ct)
    r, out, _ = reconfigure(ct, preseed, "other-dev")
    assert r.returncode == 0, out
    assert "stable for" in out
    after = state(ct)
    assert new_invocations(ct, mark, before["InvocationID"]) == {after["InvocationID"]}
    assert "DeviceId=other-dev;" in connection_string_on_disk(ct)
    # a burst of restarts trips the unit's start limit (5 in 300 s); a deliberate restart
    # resets it first instead of failing with start-limit-hit
    for _ in range(6):
        ct.run(["systemctl", "restart", UNIT], check=False)
    assert state(ct)["Result"] == "start-limit-hit"
    assert ct.run(["defender-setup", "restart"]).returncode == 0


def test_failing_credentials_roll_back_to_the_last_good_set(ct, preseed):
    install(ct, preseed, device="good-dev")
    install_test_hub(ct, reject=["rejected-dev"])
    assert ct.run(["defender-setup", "restart"]).returncode == 0
    r, out, text = reconfigure(ct, preseed, "rejected-dev")
    assert r.returncode == 0, out  # dpkg-reconfigure stays usable
    assert "VERIFICATION FAILED" in out
    assert "hub rejected rejected-dev: CONNACK not authorized" in out  # the journal excerpt
    assert "status=76" in out  # systemd's own line about the exit
    assert "rolled back to the previous credentials" in out and "service healthy" in out
    assert "DeviceId=good-dev;" in connection_string_on_disk(ct)
    s = state(ct)
    assert s["SubState"] == "running" and s["StatusText"] == "connected to test hub as good-dev"
    assert text.split("SharedAccessKey=")[1] not in out


def test_first_configuration_rejected_keeps_dpkg_usable(ct, preseed):
    """No last good set to roll back to: loud report, the device is unconfigured again (as
    the boot-time import does), and the package stays configured so that dpkg-reconfigure
    (the way to fix it) still runs."""
    assert ct.install_deb().returncode == 0  # unconfigured: nothing to roll back to later
    install_test_hub(ct, reject=["rejected-dev"])
    r, out, text = reconfigure(ct, preseed, "rejected-dev")
    assert r.returncode == 0, out
    assert "VERIFICATION FAILED and no previous credentials to roll back to" in out
    assert "the device is unconfigured, as before" in out
    assert "fix the credentials with 'dpkg-reconfigure defender-setup'" in out
    assert not ct.exists("/var/defender_iot_micro_agent/connection_string.txt")
    status = ct.run(["dpkg-query", "-W", "-f=${Status}", "defender-setup"]).stdout
    assert status == "install ok installed"
    assert text.split("SharedAccessKey=")[1] not in out
    r, out, _ = reconfigure(ct, preseed, "good-dev")
    assert r.returncode == 0 and "stable for" in out, out
    assert state(ct)["SubState"] == "running"


def test_strict_mode_returns_69_after_rolling_back(ct, preseed):
    install(ct, preseed, device="good-dev")
    install_test_hub(ct, reject=["rejected-dev"])
    bad = preseed.connection_string(device="rejected-dev")
    r = ct.run(["defender-setup", "apply", "--strict", "--connection-string-file", "-"],
               input=bad, check=False)
    assert r.returncode == 69, r.stdout + r.stderr
    assert "strict mode: exit 69" in r.stdout
    assert "DeviceId=good-dev;" in connection_string_on_disk(ct)
    assert state(ct)["SubState"] == "running"


def test_crash_loop_failure_verdict_is_fast(ct, preseed):
    install(ct, preseed, device="good-dev")
    install_test_hub(ct, crash=["crash-dev"])
    assert ct.run(["defender-setup", "restart"]).returncode == 0
    ct.run(["defender-setup", "apply", "--no-restart", "--connection-string-file", "-"],
           input=preseed.connection_string(device="crash-dev"))
    t0 = time.monotonic()
    r = ct.run(["defender-setup", "restart"])
    total = time.monotonic() - t0
    failed = re.search(r"VERIFICATION FAILED: .* \((\d+\.\d) s after the restart\)", r.stdout)
    assert failed, r.stdout
    assert float(failed.group(1)) <= 5.0
    assert "exit status 1" in r.stdout
    assert "service healthy" in r.stdout and total < 10
    assert "DeviceId=good-dev;" in connection_string_on_disk(ct)


def test_invalid_files_exit_78_once_without_restart_loop(ct, preseed):
    install(ct, preseed)
    # a short RestartSec: were 78 restarted, the unit would settle only at the start limit,
    # with NRestarts > 0
    ct.copy_in("[Service]\nRestartSec=100ms\n", f"{DROPIN_DIR}/fast.conf", mode=0o644)
    ct.run(["systemctl", "daemon-reload"])
    ct.sh(f"printf 'HostName=hub;DeviceId=x\\n' > {AGENT_DIR}/connection_string.txt")
    r = ct.run(["systemctl", "restart", UNIT], check=False)
    assert r.returncode != 0
    s = wait_for(lambda: settled(ct), 30, "the unit never settled", lambda: state(ct), 0.2)
    assert (s["ActiveState"], s["ExecMainStatus"], s["NRestarts"]) == ("failed", "78", "0")
    log = ct.run(["journalctl", "-u", UNIT, "-o", "cat", "_SYSTEMD_INVOCATION_ID="
                  + s["InvocationID"]]).stdout
    assert "not starting: invalid credentials:" in log
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1, log


def test_unconfigured_is_not_started_and_not_configured(ct):
    r = ct.install_deb()  # no answers, as piuparts installs
    assert r.returncode == 0
    out = ct.run(["defender-setup", "restart"])
    assert "not configured" in out.stdout and out.returncode == 0
    s = state(ct)
    assert s["ActiveState"] == "inactive" and s["NRestarts"] == "0"


def test_no_running_systemd_skips_the_restart(ct, preseed):
    install(ct, preseed)
    before = state(ct)["InvocationID"]
    r = ct.run(["defender-setup", "restart"], env={"DPKG_ROOT": "/"})
    assert r.stdout.startswith("restart skipped: DPKG_ROOT is set")
    assert "will start on first boot" in r.stdout
    ct.copy_in("#!/bin/sh\nexit 101\n", "/usr/sbin/policy-rc.d", mode=0o755)
    r = ct.run(["defender-setup", "restart"])
    assert "restart skipped: /usr/sbin/policy-rc.d forbids it (exit 101)" in r.stdout
    assert r.returncode == 0
    assert state(ct)["InvocationID"] == before  # nothing was restarted


CRASHING_APPLY = '''\
"""defender-setup apply, SIGKILLed in the middle of switching the files (test only)."""
import os
import signal
import sys

from defender_setup import cli

real_replace, calls = os.replace, [0]


def replace(*args, **kwargs):
    # replaces: 1 the journal's commit, 2 previous.new -> previous, 3 the first credential
    # file (certificate_private.pem); the 4th never happens
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(*args, **kwargs)


os.replace = replace
sys.exit(cli.main(sys.argv[1:]))
'''


def test_an_interrupted_update_is_completed_before_the_agent_starts(ct, preseed, identity):
    install(ct, preseed)
    cert, key = identity("good-dev")
    ct.copy_in(cert, "/root/device.pem")
    ct.copy_in(key, "/root/device.key")
    ct.copy_in(f"HostName={preseed.HUB};DeviceId=good-dev;ModuleId=DefenderIotMicroAgent;"
               "x509=true\n", "/root/cs.txt")
    ct.copy_in(CRASHING_APPLY, "/root/crashing-apply.py")
    r = ct.run(["python3", "-I", "/root/crashing-apply.py", "apply", "--no-restart",
                "--connection-string-file", "/root/cs.txt", "--certificate", "/root/device.pem",
                "--private-key", "/root/device.key"], check=False)
    assert r.returncode == -9 or r.returncode == 137, r  # the crash landed
    # half switched: the journal is there, the new key beside the old SAS connection string
    assert ct.exists(f"{AGENT_DIR}/.defender-setup/txn")
    assert ct.exists(f"{AGENT_DIR}/certificate_private.pem")
    assert "SharedAccessKey=" in connection_string_on_disk(ct)
    status = json.loads(ct.run(["defender-setup", "status", "--json"]).stdout)
    assert status["interrupted_update"] is True  # reported, not repaired, by a reader
    assert ct.exists(f"{AGENT_DIR}/.defender-setup/txn")
    # what a reboot does to the agent: start it again, no defender-setup command in between
    since = cursor(ct)
    ct.run(["systemctl", "restart", UNIT])
    s = state(ct)
    assert (s["ActiveState"], s["SubState"]) == ("active", "running"), s
    assert not ct.exists(f"{AGENT_DIR}/.defender-setup/txn")
    assert connection_string_on_disk(ct).rstrip().endswith("x509=true")
    assert ct.exists(f"{AGENT_DIR}/certificate_public.pem")
    log = ct.run(["journalctl", "-u", UNIT, "-u", "defender-setup-repair.service",
                  "--after-cursor", since, "-o", "cat"]).stdout
    assert "repaired: an interrupted credential update was completed" in log, log
    status = json.loads(ct.run(["defender-setup", "status", "--json"]).stdout)
    assert (status["method"], status["problem"]) == ("certificate", None), status


def agent_files(ct) -> str:
    """Every file of the agent directory (private state included) with its mode and digest."""
    return ct.run(["sh", "-c", f"cd {AGENT_DIR} && find . -type f -printf '%m %p ' "
                   "-exec sha256sum {} \\; | sort"]).stdout


def test_a_chain_systemd_cannot_hand_the_agent_is_refused_and_nothing_changes(ct, preseed,
                                                                                identity):
    """1 MiB of copies of one leaf: systemd refuses to load it for the unit (243/CREDENTIALS,
    "Protocol error"), so apply must refuse it (65) before writing or restarting anything."""
    install(ct, preseed)
    cert, key = identity("good-dev", key="p256")
    chain = cert * ((1 << 20) // len(cert))
    ct.copy_in(chain, "/root/chain.pem")
    ct.copy_in(key, "/root/device.key")
    ct.copy_in(f"HostName={preseed.HUB};DeviceId=good-dev;ModuleId=DefenderIotMicroAgent;"
               "x509=true\n", "/root/cs.txt")
    before, files = state(ct), agent_files(ct)
    assert "connection_string.txt" in files and before["SubState"] == "running"
    r = ct.run(["defender-setup", "apply", "--connection-string-file", "/root/cs.txt",
                "--certificate", "/root/chain.pem", "--private-key", "/root/device.key"],
               check=False)
    assert r.returncode == 65, r
    assert r.stdout == "" and r.stderr == (
        f"defender-setup: error: certificate: /root/chain.pem is {len(chain)} bytes; a "
        "certificate file is at most 768 KiB (systemd hands the agent at most 1 MiB of "
        "credentials in all; the chain needs only the leaf and its issuers, each once)\n")
    assert agent_files(ct) == files
    after = state(ct)
    assert (after["InvocationID"], after["SubState"]) == (before["InvocationID"], "running")
