"""The agent's reading of its credentials, with processes: as the real agent process from a
credentials directory alone, and a sealed set read by hand (left to systemd)."""

from __future__ import annotations

import pytest

from defender_setup.agent.runtime import load_credentials
from defender_setup.errors import SetupError
from tests.agentproc import Agent
from tests.fakes import FakeCreds, handed_over, seal_set


@pytest.mark.allow_subprocess("systemd-creds")
def test_a_sealed_set_read_by_hand_is_left_to_systemd(tmp_path, monkeypatch, cert_inputs):
    """Without $CREDENTIALS_DIRECTORY (a run by hand as root) the agent reads the agent
    directory as systemd would hand it over; a sealed file only systemd decrypts for it (the
    agent imports no storage or sealing code). check's network checks read the set through
    the provisioning core's snapshot instead."""
    FakeCreds(tmp_path).path_env(monkeypatch)
    seal_set(tmp_path, cert_inputs.validated())
    with pytest.raises(SetupError, match="is sealed: only systemd decrypts it"):
        load_credentials(tmp_path)


@pytest.mark.allow_subprocess("python3")
def test_process_runs_from_the_credentials_alone(tmp_path, sas_inputs):
    d = handed_over(tmp_path / "c", connection_string_txt=sas_inputs.validated().files[
        "connection_string.txt"][0])
    agent = Agent.start(tmp_path / "no-root", tmp_path, CREDENTIALS_DIRECTORY=str(d))
    try:
        assert "READY=1" in (agent.next_message() or "")
        code, _took, err = agent.terminate()
    finally:
        agent.close()
    assert code == 0, err
    assert "starting as hub1.azure-devices.net/dev1/" in err
