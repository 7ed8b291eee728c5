"""defender_setup.verify: the restart verdict and the roll-back, against a fake systemctl.

The fake systemctl (tests/fakes.py) is first on PATH and walks through scripted
unit states; the credential files are real (written with AgentDir in a throw-away root). The
clock is a fake that advances when the verifier sleeps, so the 1.5 s window costs nothing.
"""

import io
import os

import pytest

from defender_setup import facts
from defender_setup.agentdir import AgentDir
from defender_setup.credentials import validate
from defender_setup.service import Service
from defender_setup.verify import STABILITY_WINDOW, settle
from tests.fakes import FakeClock, FakeJournal, FakeSystemd, failed, running

pytestmark = pytest.mark.allow_subprocess("systemctl", "policy-rc.d")

KEY_A = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="  # test-only dummy keys
KEY_B = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI="


def write_set(root, device, key):
    text = (f"HostName=hub.example.net;DeviceId={device};ModuleId=DefenderIotMicroAgent;"
            f"SharedAccessKey={key}")
    AgentDir(root).write(validate("connection-string", text).files)


def device_on_disk(root):
    return AgentDir(root).current()["connection_string.txt"].decode()


def verify(root, fake, monkeypatch, strict=False, environ=None, timeout=30):
    fake.path_env(monkeypatch)
    out, clock = io.StringIO(), FakeClock()
    # The throw-away root stands for the host here; a real --root DIR never reaches systemd.
    svc = Service(root, environ=environ or {}, journal=lambda: FakeJournal(), manages_root=True)
    result = settle(root, timeout=timeout, strict=strict, out=out, service=svc, clock=clock,
                    sleep=clock.sleep)
    return result.code, out.getvalue()


def test_healthy_single_restart(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "dev-1", KEY_A)
    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": [running("inv-1", status="hub.example.net/dev-1")]}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 0
    assert out.strip() == (
        f"defender-iot-micro-agent.service: active (running), stable for "
        f"{STABILITY_WINDOW:.1f} s, status: hub.example.net/dev-1"
    )
    assert len(fake.restarts()) == 1
    known = facts.read(booted_root)
    assert (known.last_change["result"], known.last_verification["result"]) == (
        "verified", "verified")
    calls = fake.calls()
    assert calls.index("reset-failed defender-iot-micro-agent.service") < calls.index(
        "restart defender-iot-micro-agent.service")


@pytest.mark.parametrize("strict,expected", [(False, 0), (True, 69)])
def test_crash_after_ready_rolls_back(booted_root, tmp_path, monkeypatch, strict, expected):
    write_set(booted_root, "good", KEY_A)
    write_set(booted_root, "bad", KEY_B)
    crash = [running("inv-1", pid=100), running("inv-1", pid=100),
             {**running("inv-1", pid=0), "SubState": "auto-restart", "ActiveState": "activating"}]
    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": crash}, {"states": [running("inv-2", pid=200)]}])
    code, out = verify(booted_root, fake, monkeypatch, strict=strict)
    assert code == expected
    assert "VERIFICATION FAILED: defender-iot-micro-agent.service stopped after" in out
    assert "hub rejected the identity: not authorized" in out  # the journal excerpt
    assert "rolled back to the previous credentials" in out
    assert "service healthy" in out
    assert "DeviceId=good" in device_on_disk(booted_root)
    assert len(fake.restarts()) == 2  # the failed one, then the rolled-back set
    assert KEY_A not in out and KEY_B not in out
    agent = AgentDir(booted_root)
    assert agent.record("counters.json") == {"rollbacks": 1}
    # the public facts: the judged change was rolled back; the current set is the roll-back's
    known = facts.read(booted_root)
    assert known.origin == "rollback"
    assert known.last_change["result"] == "rolled-back"
    assert known.last_verification["result"] == "rolled-back"


def test_start_failure_without_previous_set_unconfigures_and_is_69(booted_root, tmp_path,
                                                                    monkeypatch):
    write_set(booted_root, "only", KEY_A)
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [failed("inv-1")], "rc": 1}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 69
    assert "did not start: failed (failed), result exit-code, exit status 76" in out
    assert "the device is unconfigured, as before" in out
    assert len(fake.restarts()) == 1
    agent = AgentDir(booted_root)
    assert agent.current() == {} and agent.has_previous()  # kept for 'rollback', not lost
    assert "reset-failed defender-iot-micro-agent.service" in fake.calls()[-1]


def test_rolled_back_set_failing_too_is_69(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "good", KEY_A)
    write_set(booted_root, "bad", KEY_B)
    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": [failed("inv-1")], "rc": 1}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 69
    assert "the previous credentials fail too" in out


def test_systemd_restarting_it_counts_as_failure(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "good", KEY_A)
    write_set(booted_root, "bad", KEY_B)
    flapping = [running("inv-1", pid=100), running("inv-1", pid=100, restarts=1)]
    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": flapping}, {"states": [running("inv-2")]}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 0
    assert "NRestarts 0 -> 1" in out


def test_same_invocation_means_no_restart_happened(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "good", KEY_A)
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [running("inv-0")]}])
    code, out = verify(booted_root, fake, monkeypatch, strict=True)
    assert code == 69
    assert "same InvocationID" in out


def test_timeout_bounds_the_wait(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "good", KEY_A)
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [running("inv-1")]}])
    code, out = verify(booted_root, fake, monkeypatch, strict=True, timeout=0.5)
    assert code == 69
    assert "not stable within the 0.5 s timeout" in out


def test_unconfigured_is_reported_and_not_restarted(booted_root, tmp_path, monkeypatch):
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 0
    assert "not configured" in out
    assert fake.calls() == []


def test_condition_not_met_is_not_configured(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "good", KEY_A)
    dead = {**running("inv-0", pid=0), "ActiveState": "inactive", "SubState": "dead",
            "ConditionResult": "no"}
    fake = FakeSystemd(tmp_path, [dead], [{"states": [dead]}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 0
    assert "not configured (start condition not met)" in out


@pytest.mark.parametrize("setup,environ,reason", [
    (lambda r: None, {"DPKG_ROOT": "/target"}, "DPKG_ROOT is set"),
    (lambda r: os.rmdir(r / "run/systemd/system"), {}, "systemd is not running"),
    (lambda r: policy_rc_d(r, 101), {}, "policy-rc.d forbids it (exit 101)"),
])
def test_no_running_systemd_skips(booted_root, tmp_path, monkeypatch, setup, environ, reason):
    write_set(booted_root, "good", KEY_A)
    setup(booted_root)
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{}])
    code, out = verify(booted_root, fake, monkeypatch, environ=environ)
    assert code == 0
    assert out.startswith("restart skipped: ")
    assert reason in out
    assert out.rstrip().endswith("the unit is enabled and will start on first boot")
    assert fake.calls() == []


def test_policy_rc_d_allowing_restarts(booted_root, tmp_path, monkeypatch):
    write_set(booted_root, "good", KEY_A)
    policy_rc_d(booted_root, 0)
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [running("inv-1")]}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 0 and "active (running)" in out


def policy_rc_d(booted_root, code):
    path = booted_root / "usr/sbin/policy-rc.d"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexit {code}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("load,code,text", [
    ("masked", 0, "restart skipped: defender-iot-micro-agent.service is masked"),
    ("not-found", 69, "not installed"),
])
def test_masked_or_missing_unit_is_not_restarted(booted_root, tmp_path, monkeypatch, load, code,
                                                 text):
    write_set(booted_root, "good", KEY_A)
    write_set(booted_root, "other", KEY_B)
    fake = FakeSystemd(tmp_path, [{**running("inv-0"), "LoadState": load}], [{}])
    got, out = verify(booted_root, fake, monkeypatch)
    assert (got, text in out) == (code, True), out
    assert fake.restarts() == []
    assert "DeviceId=other" in device_on_disk(booted_root)  # no roll-back


def test_a_failure_not_about_the_identity_keeps_a_first_set(booted_root, tmp_path, monkeypatch):
    """A broken conf.json (exit 78) with no previous set: the credentials are not what is
    wrong, so they stay; only the hub refusing the identity (76) unconfigures."""
    write_set(booted_root, "only", KEY_A)
    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": [failed("inv-1", status=78)], "rc": 1}])
    code, out = verify(booted_root, fake, monkeypatch)
    assert code == 69 and "no roll-back possible" in out
    assert "DeviceId=only" in device_on_disk(booted_root)
