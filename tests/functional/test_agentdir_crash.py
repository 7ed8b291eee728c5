"""Fault injection: SIGKILL ``apply`` at every step and at random moments.

The claim under test (agentdir's docstring): after a crash at any point the agent sees the
complete old set or the complete new set, or the journal is present and the next command
repairs the set to the complete new one. Secret files are never visible with a loose mode.

Two ways of killing, 200+ runs in all:

* step kills: a forked child runs ``cli.main(["apply", ...])`` with the file-system calls the
  writer uses wrapped so that the N-th call SIGKILLs the process, for every N up to the end
  and for random N across several method switches;
* timed kills: the real ``defender-setup apply`` in a fresh interpreter, killed after a random
  delay (covers interpreter start, imports and validation too).
"""

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defender_setup import cli
from defender_setup.agentdir import AgentDir

WRAPPED = ("open", "write", "fsync", "replace", "link", "unlink", "mkdir", "rmdir", "rename",
           "chmod", "fchmod")


def _files(files):
    return {name: data for name, (data, _) in files.items()}


def _kill_at(step: int) -> None:
    """Wrap the os calls the writer makes; the ``step``-th one kills the process."""
    count = [0]
    for name in WRAPPED:
        real = getattr(os, name)

        def wrapper(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, wrapper)


def _apply_in_child(root, inputs, step, tmp_path) -> bool:
    """Run apply in a forked child killed at ``step``; return True if it was killed."""
    cs_file = tmp_path / "cs.txt"
    cs_file.write_bytes(inputs.connection_string)
    argv = ["apply", "--no-restart", "--root", str(root), "--method", inputs.method,
            "--connection-string-file", str(cs_file)]
    if inputs.certificate:
        (tmp_path / "c.pem").write_bytes(inputs.certificate)
        (tmp_path / "k.pem").write_bytes(inputs.private_key)
        argv += ["--certificate", str(tmp_path / "c.pem"), "--private-key",
                 str(tmp_path / "k.pem")]
    pid = os.fork()
    if pid == 0:  # child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            _kill_at(step)
            os._exit(cli.main(argv))
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"apply failed with {os.WEXITSTATUS(status)}"
    return False


def _assert_old_new_or_pending(agent: AgentDir, old: dict, new: dict) -> None:
    seen = agent.current()
    for name in seen:
        if name != "certificate_public.pem":
            assert stat.S_IMODE(os.lstat(agent.path / name).st_mode) == 0o600
    assert seen in (old, new) or agent.pending(), "mixed set without a journal"
    agent.repair()
    assert agent.current() in (old, new)
    assert not agent.pending()
    if agent.path.exists():
        assert set(os.listdir(agent.path)) <= {".defender-setup", *new, *old}


def _outcome(agent: AgentDir, old: dict, new: dict) -> str:
    """Where a kill landed: before the write ("old"), after it ("new") or in it."""
    leftovers = any((agent.state / name).exists() for name in ("staging", "previous.new", "txn"))
    if leftovers:
        return "interrupted"
    return "old" if agent.current() == old else "new" if agent.current() == new else "mixed"


def _scenario(root, tmp_path, old_inputs, new_inputs):
    shutil.rmtree(root, ignore_errors=True)
    agent = AgentDir(root)
    old = {}
    if old_inputs is not None:
        agent.write(old_inputs.validated().files)
        old = agent.current()
    return agent, old, _files(new_inputs.validated().files)


@pytest.mark.allow_subprocess("fork")
def test_sigkill_at_every_step_and_random_steps(root, tmp_path, sas_inputs, cert_inputs):
    scenarios = [(None, sas_inputs), (sas_inputs, cert_inputs), (cert_inputs, sas_inputs),
                 (cert_inputs, cert_inputs)]
    rng = random.Random(20261128)
    runs = killed = 0
    for old_inputs, new_inputs in scenarios:
        step = 1
        while True:  # every step until apply completes unharmed
            agent, old, new = _scenario(root, tmp_path, old_inputs, new_inputs)
            was_killed = _apply_in_child(root, new_inputs, step, tmp_path)
            runs, killed = runs + 1, killed + was_killed
            _assert_old_new_or_pending(agent, old, new)
            if not was_killed:
                assert agent.current() == new
                break
            step += 1
        last = step
        for _ in range(25):  # and random steps, also past the end
            agent, old, new = _scenario(root, tmp_path, old_inputs, new_inputs)
            step = rng.randint(1, last + 5)
            killed += _apply_in_child(root, new_inputs, step, tmp_path)
            runs += 1
            _assert_old_new_or_pending(agent, old, new)
    print(f"{runs} runs, {killed} killed")
    assert runs >= 200 and killed >= 150


@pytest.mark.allow_subprocess("python3")
def test_sigkill_the_real_command_at_random_moments(root, tmp_path, sas_inputs, cert_inputs):
    rng = random.Random(7)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    (tmp_path / "c.pem").write_bytes(cert_inputs.certificate)
    (tmp_path / "k.pem").write_bytes(cert_inputs.private_key)
    (tmp_path / "cs.txt").write_bytes(cert_inputs.connection_string)
    argv = [sys.executable, "-m", "defender_setup", "apply", "--no-restart", "--root", str(root),
            "--connection-string-file", str(tmp_path / "cs.txt"), "--certificate",
            str(tmp_path / "c.pem"), "--private-key", str(tmp_path / "k.pem")]
    outcomes = []
    for run in range(16):
        agent, old, new = _scenario(root, tmp_path, sas_inputs, cert_inputs)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if run % 2:  # anywhere: interpreter start, imports, validation, the write
            time.sleep(rng.uniform(0.0, 0.4))
        else:  # once the write has begun (its staging directory exists), a moment later
            deadline = time.monotonic() + 10
            while not (agent.state / "staging").exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "apply never began to write"
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.005))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(_outcome(agent, old, new))
        _assert_old_new_or_pending(agent, old, new)
    print(outcomes)
    # The claim is about kills during the write: enough of them must have landed there.
    assert outcomes.count("interrupted") >= 4, outcomes
