"""defender_setup.service without running systemctl: parsing, an injected runner, the refusal
to ask the host about another root, and the journal filter (the reader is injected;
python-systemd itself runs in the container tests, against a real journal)."""

import pytest

from defender_setup.errors import ServiceError
from defender_setup.service import Service, UnitState
from tests.fakes import FakeJournal, FakeSystemd, plant_policy_rc_d, running


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


def test_parse_reads_every_property_into_its_field():
    s = UnitState.parse("InvocationID=i\nMainPID=1\nNRestarts=2\nActiveState=a\nSubState=s\n"
                        "StatusText=t\nExecMainStatus=3\nResult=r\nConditionResult=c\n"
                        "UnitFileState=u\nLoadState=l\n")
    assert s == UnitState("i", 1, 2, "a", "s", "t", 3, "r", "c", "u", "l")


def test_injected_runner_and_timeout(tmp_path):
    import subprocess

    def slow(argv, timeout):
        raise subprocess.TimeoutExpired(argv, timeout)

    with pytest.raises(ServiceError, match="did not finish within 3 s"):
        Service(tmp_path, runner=slow).systemctl("restart", "x", timeout=3)


def test_another_root_never_asks_the_hosts_systemd(tmp_path, monkeypatch):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    ran = plant_policy_rc_d(tmp_path)
    fake = FakeSystemd(tmp_path, [running(status="connected")], [{}])
    fake.path_env(monkeypatch)
    svc = Service(tmp_path, environ={})
    assert svc.state() is None
    assert svc.skip_reason() == svc.unavailable_reason()
    assert f"--root {tmp_path} is not /" in svc.unavailable_reason()
    assert fake.calls() == [] and not ran.exists()
    assert Service("/", environ={}).manages_root and Service("//.", environ={}).manages_root


def test_journal_lines_filter_on_unit_and_invocation(tmp_path):
    entries = [{"SYSLOG_IDENTIFIER": "defender-iot-micro-agent", "_PID": 5,
                "MESSAGE": f"line {i}"} for i in range(20)]
    entries.append({"SYSLOG_IDENTIFIER": "systemd", "MESSAGE": b"Main process exited"})
    reader = FakeJournal(entries)
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


def test_journal_lines_cannot_write_into_the_terminal(tmp_path):
    # the agent's lines quote what a hub or proxy said; each entry stays one visible line
    reader = FakeJournal([{"SYSLOG_IDENTIFIER": "agent\x1b[8m", "_PID": 5,
                           "MESSAGE": "proxy: 403: Forbidden\x1b[31m\n[ ok ] fine\x07"}])
    lines = Service(tmp_path, journal=lambda: reader).journal_lines("inv-1")
    assert lines == [" agent\\x1b[8m[5]: proxy: 403: Forbidden\\x1b[31m\\n[ ok ] fine\\x07"]
