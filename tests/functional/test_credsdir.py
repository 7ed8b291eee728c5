"""The agent's reading of its credentials, with processes: as the real agent process from a
credentials directory alone, and a sealed set read as root through (the fake) systemd-creds."""

from __future__ import annotations

import pytest

from defender_setup.agent.runtime import load_credentials
from tests.agentproc import Agent
from tests.fakes import FakeCreds, seal_set
from tests.unit.test_credsdir import handed_over


@pytest.mark.allow_subprocess("systemd-creds")
def test_a_sealed_set_read_as_root_is_decrypted_into_memory(tmp_path, monkeypatch, cert_inputs):
    """Without $CREDENTIALS_DIRECTORY (check's network checks, a run by hand as root) the
    sealed key is decrypted through systemd-creds and handed over in a memory file."""
    from defender_setup.agentdir import AgentDir

    FakeCreds(tmp_path).path_env(monkeypatch)
    validated = cert_inputs.validated()
    seal_set(tmp_path, validated)
    creds = load_credentials(tmp_path)
    key = creds.sources["certificate_private.pem"]
    assert str(key).startswith("/proc/self/fd/")
    assert key.read_bytes() == validated.files["certificate_private.pem"][0]
    assert creds.sources["certificate_public.pem"].parent == AgentDir(tmp_path).path


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
