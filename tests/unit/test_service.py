"""defender_setup.service: the systemctl wrapper and the journal filter.

systemctl is a fake first on PATH (a real executable, so the wrapper's subprocess handling
runs for real); the journal reader is injected (python-systemd itself runs in the
integration tests, against a real journal).
"""

import pytest

from defender_setup.errors import ServiceError
from defender_setup.service import Service, UnitState
from tests.unit.fake_systemd import FakeSystemd, failed, running

pytestmark = pytest.mark.allow_subprocess("systemctl")


def test_parse_and_describe():
    s = UnitState.parse(
        "InvocationID=abc\nMainPID=12\nNRestarts=3\nActiveState=failed\nSubState=failed\n"
        "StatusText=hub/dev/mod (connection-string)\nExecMainStatus=78\nResult=exit-code\n"
        "ConditionResult=yes\nUnknown=x\n"
    )
    assert (s.invocation_id, s.main_pid, s.n_restarts) == ("abc", 12, 3)
    assert not s.running
    assert s.describe() == "failed (failed), result exit-code, exit status 78"
    assert UnitState.parse("MainPID=[not set]\n").main_pid == 0


def test_show_through_fake_systemctl(tmp_path, monkeypatch):
    fake = FakeSystemd(tmp_path, [running("inv-9", pid=7, status="connected")], [{}])
    fake.path_env(monkeypatch)
    s = Service(tmp_path).show()
    assert (s.invocation_id, s.main_pid, s.status_text) == ("inv-9", 7, "connected")
    assert s.running
    assert fake.calls()[0].startswith("show -p InvocationID,MainPID,NRestarts,ActiveState,")


def test_failed_restart_raises_service_error_with_systemctls_message(tmp_path, monkeypatch):
    fake = FakeSystemd(tmp_path, [failed()], [{"rc": 1}])
    fake.path_env(monkeypatch)
    with pytest.raises(ServiceError) as err:
        Service(tmp_path).restart()
    assert err.value.exit_code == 69
    assert "'systemctl restart defender-iot-micro-agent.service' failed: Job for unit failed." \
        == str(err.value)


def test_missing_systemctl_is_a_service_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match="cannot run systemctl"):
        Service(tmp_path).show()


def test_injected_runner_and_timeout(tmp_path):
    import subprocess

    def slow(argv, timeout):
        raise subprocess.TimeoutExpired(argv, timeout)

    with pytest.raises(ServiceError, match="did not finish within 3 s"):
        Service(tmp_path, runner=slow).systemctl("restart", "x", timeout=3)


def test_state_for_status(tmp_path, monkeypatch):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    fake = FakeSystemd(tmp_path, [running(status="connected")], [{}])
    fake.path_env(monkeypatch)
    state = Service(tmp_path, environ={}, manages_root=True).state()
    assert state["active"] is True
    assert state["summary"] == "active (running), status: connected"
    assert Service(tmp_path / "nowhere", environ={}, manages_root=True).state() is None


def planted_policy_rc_d(root):
    """An executable policy-rc.d in the tree that leaves a mark when it runs."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.parent.mkdir(parents=True)
    policy.write_text(f"#!/bin/sh\ntouch {root}/RAN\nexit 0\n")
    policy.chmod(0o755)
    return root / "RAN"


def test_state_never_runs_the_trees_policy_rc_d(tmp_path, monkeypatch):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    ran = planted_policy_rc_d(tmp_path)
    fake = FakeSystemd(tmp_path, [running(status="connected")], [{}])
    fake.path_env(monkeypatch)
    assert Service(tmp_path, environ={}, manages_root=True).state()["active"] is True
    assert not ran.exists()


def test_another_root_never_asks_the_hosts_systemd(tmp_path, monkeypatch):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    ran = planted_policy_rc_d(tmp_path)
    fake = FakeSystemd(tmp_path, [running(status="connected")], [{}])
    fake.path_env(monkeypatch)
    svc = Service(tmp_path, environ={})
    assert svc.state() is None
    assert svc.skip_reason() == svc.unavailable_reason()
    assert f"--root {tmp_path} is not /" in svc.unavailable_reason()
    assert fake.calls() == [] and not ran.exists()
    assert Service("/", environ={}).manages_root and Service("//.", environ={}).manages_root


class RecordingReader:
    def __init__(self, entries):
        self.entries, self.matches, self.closed = entries, [], False

    def add_match(self, **kw):
        self.matches.append(kw)

    def add_disjunction(self):
        self.matches.append("OR")

    def __iter__(self):
        return iter(self.entries)

    def close(self):
        self.closed = True


def test_journal_lines_filter_on_unit_and_invocation(tmp_path):
    entries = [{"SYSLOG_IDENTIFIER": "defender-iot-micro-agent", "_PID": 5,
                "MESSAGE": f"line {i}"} for i in range(20)]
    entries.append({"SYSLOG_IDENTIFIER": "systemd", "MESSAGE": b"Main process exited"})
    reader = RecordingReader(entries)
    lines = Service(tmp_path, journal=lambda: reader).journal_lines("inv-1", count=15)
    assert reader.matches == [
        {"_SYSTEMD_UNIT": "defender-iot-micro-agent.service", "_SYSTEMD_INVOCATION_ID": "inv-1"},
        "OR",
        {"UNIT": "defender-iot-micro-agent.service", "INVOCATION_ID": "inv-1"},
    ]
    assert len(lines) == 15
    assert lines[-1] == " systemd: Main process exited"
    assert lines[0] == " defender-iot-micro-agent[5]: line 6"
    assert reader.closed
