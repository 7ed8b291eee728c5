"""The command line with other processes: writers and readers kept waiting by a forked lock
holder, and the real command with its standard streams closed."""

import json
import os
import time

import pytest

from tests.clirun import Run, agent_path, assert_no_secret, pending_update
from tests.conftest import DEVICE, snapshot
from tests.fakes import FakeCreds, seal_set
from tests.holder import Holder


@pytest.fixture
def run(root, tmp_path, capsys, monkeypatch):
    return Run(root, tmp_path, capsys, monkeypatch)


def _real_cli(*argv, **kw):
    import subprocess
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(["/usr/bin/python3", "-m", "defender_setup", *argv], env=env,
                          stderr=subprocess.PIPE, **kw)


@pytest.mark.allow_subprocess("fork")
def test_a_writer_waits_for_another_then_exits_75_naming_it(run, sas_inputs, cert_inputs):
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    with Holder(agent_path(run) / ".defender-setup/lock") as pid:
        before = snapshot(run.root)
        for argv in (["apply", "--no-restart", *run.inputs(cert_inputs)],
                     ["rollback", "--no-restart"], ["restart"]):
            code, out, err = run(*argv, "--lock-timeout", "0.2")
            assert code == 75, (argv, err)
            assert f"pid {pid}" in err and err.count("\n") == 1
            assert snapshot(run.root) == before
    assert run("apply", "--no-restart", *run.inputs(cert_inputs))[0] == 0


@pytest.mark.allow_subprocess("fork")
def test_readers_wait_for_a_writer_then_exit_75(run, sas_inputs):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    with Holder(agent_path(run) / ".defender-setup/lock") as pid:
        code, out, err = run("status", "--lock-timeout", "0.1")
        assert code == 75 and f"pid {pid}" in err
    with Holder(agent_path(run) / ".defender-setup/lock", "shared"):
        assert run("status", "--lock-timeout", "0")[0] == 0  # readers share the lock


@pytest.mark.allow_subprocess("fork")
def test_repair_does_not_wait_for_a_writer(run, sas_inputs, cert_inputs):
    agent = pending_update(run, sas_inputs, cert_inputs)
    with Holder(agent.state / "lock"):
        started = time.monotonic()
        code, out, _ = run("repair", "--lock-timeout", "0.2")
        assert time.monotonic() - started < 2
    assert code == 0 and "repair skipped" in out and agent.pending()


@pytest.mark.allow_subprocess("python3")
def test_closed_stdin_and_stdout_in_a_real_process(run, sas_inputs):
    r = _real_cli("validate", "--connection-string-file", "-", stdin=None,
                  pass_fds=(), close_fds=True, preexec_fn=lambda: os.close(0))
    assert r.returncode == 66 and r.stderr.count(b"\n") == 1, r.stderr
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    # status | head -0: the reader of the pipe is gone before status writes
    read_end, write_end = os.pipe()
    os.close(read_end)
    r = _real_cli("status", "--root", str(run.root), stdout=write_end)
    os.close(write_end)
    assert r.returncode == 74, r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    assert b"standard output is closed" in r.stderr


# -- sealed sets (the fake systemd-creds) ---------------------------------------------------
@pytest.mark.allow_subprocess("systemd-creds")
def test_status_and_check_of_a_sealed_set_here_and_on_another_machine(run, sas_inputs,
                                                                      tmp_path, monkeypatch):

    creds = FakeCreds(tmp_path)
    creds.path_env(monkeypatch)
    seal_set(run.root, sas_inputs.validated())
    code, out, _ = run("status")
    assert "secrets:         sealed (host key)" in out and f"device:          {DEVICE}" in out
    code, out, _ = run("check", "--offline", "--json")
    sealed = next(c for c in json.loads(out)["checks"] if c["id"] == "sealed-credentials")
    assert (code, sealed["status"]) == (0, "ok")
    assert_no_secret(sas_inputs, out)

    creds.machine(b"another machine")  # the sealed set copied elsewhere
    code, out, _ = run("check", "--offline")
    assert code == 78
    assert "[FAIL] sealed-credentials" in out and "does not decrypt on this machine" in out
    assert "[skip] credentials-valid" in out
    code, out, _ = run("status")
    assert "problem: the sealed credentials cannot be read" in out
    code, _, err = run("unseal", "--no-restart")
    assert code == 78 and "give the credentials again" in err


@pytest.mark.allow_subprocess("systemd-creds")
def test_apply_without_seal_keeps_a_sealed_set_sealed(run, sas_inputs, cert_inputs, tmp_path,
                                                      monkeypatch):
    from defender_setup import sealing
    from defender_setup.agentdir import AgentDir

    FakeCreds(tmp_path).path_env(monkeypatch)
    seal_set(run.root, sas_inputs.validated())
    code, out, _ = run("apply", "--no-restart", *run.inputs(cert_inputs))
    # sealed again; in this throw-away root (not the running system) at the "first boot"
    assert code == 0 and "sealing deferred to the first boot" in out
    assert AgentDir(run.root).record(sealing.PENDING) is not None



@pytest.mark.allow_subprocess("python3")
def test_apply_timeout_0_exits_2_before_anything_is_written(booted_root, tmp_path, sas_inputs):
    """The real command on a root that looks booted: a --timeout no verification can pass
    is refused by the parser, before any input is read, any file written or systemctl run."""
    cs = tmp_path / "cs.txt"
    cs.write_bytes(sas_inputs.connection_string)
    before = snapshot(booted_root)
    r = _real_cli("apply", "--root", str(booted_root), "--timeout", "0",
                  "--connection-string-file", str(cs))
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().splitlines()[-1] == (
        "defender-setup apply: error: argument --timeout: must be a number of seconds from 5 "
        "to 3600")
    assert r.stdout == b"" and snapshot(booted_root) == before
    assert not (booted_root / "var").exists()


@pytest.mark.allow_subprocess("systemd-creds")
def test_status_and_check_report_a_plain_secret_left_in_the_previous_generation(
        run, sas_inputs, tmp_path, monkeypatch):
    from tests.fakes import debian12
    from tests.functional.test_sealing import interrupted_seal

    FakeCreds(tmp_path).path_env(monkeypatch)
    debian12(run.root)
    interrupted_seal(run.root, sas_inputs)  # sealed now, the plain copy kept as previous
    code, out, _ = run("status")
    assert code == 0 and "secrets:         sealed (host key)" in out
    assert ("warning: a plain secret is left in the previous generation "
            "(connection_string.txt); run 'defender-setup seal' to seal it") in out
    assert json.loads(run("status", "--json")[1])["sealing"]["plain_previous"] == [
        "connection_string.txt"]
    code, out, _ = run("check", "--offline", "--json")
    sealed = next(c for c in json.loads(out)["checks"] if c["id"] == "sealed-credentials")
    assert (code, sealed["status"]) == (0, "warning")
    assert sealed["message"] == ("sealed (host key), but a plain secret is left in the previous "
                                 "generation (connection_string.txt); run 'defender-setup "
                                 "seal' to seal it")
    assert_no_secret(sas_inputs, out)
