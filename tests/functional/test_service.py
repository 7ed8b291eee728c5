"""defender_setup.service against a fake systemctl (a real executable first on PATH)."""

import pytest

from defender_setup.errors import ServiceError
from defender_setup.service import Service
from tests.fakes import FakeSystemd, failed, plant_policy_rc_d, running

pytestmark = pytest.mark.allow_subprocess("systemctl")


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


def test_state_for_status(tmp_path, monkeypatch):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    fake = FakeSystemd(tmp_path, [running(status="connected")], [{}])
    fake.path_env(monkeypatch)
    state = Service(tmp_path, environ={}, manages_root=True).state()
    assert state["active"] is True
    assert state["summary"] == "active (running), status: connected"
    assert Service(tmp_path / "nowhere", environ={}, manages_root=True).state() is None


def test_state_never_runs_the_trees_policy_rc_d(tmp_path, monkeypatch):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    ran = plant_policy_rc_d(tmp_path)
    fake = FakeSystemd(tmp_path, [running(status="connected")], [{}])
    fake.path_env(monkeypatch)
    assert Service(tmp_path, environ={}, manages_root=True).state()["active"] is True
    assert not ran.exists()
