"""The textfile metrics on a throw-away root: the writer (atomic, 0644, never through a link,
nothing without node_exporter's directory), the writers' lock refreshing them, and
Prometheus' own parser (promtool, Debian's prometheus package) on what is written."""

import os
import shutil
import subprocess

import pytest

from defender_setup import __version__, metrics
from tests.clirun import Run, agent_path, assert_no_secret
from tests.conftest import snapshot
from tests.holder import Holder

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


@pytest.fixture
def run(root, tmp_path, capsys, monkeypatch):
    return Run(root, tmp_path, capsys, monkeypatch)


@pytest.fixture
def textfile(root):
    path = root / metrics.TEXTFILE_DIR
    path.mkdir(parents=True)
    return path


def promtool(text: str) -> None:
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def parsed(path) -> dict:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in path.read_text().splitlines() if not line.startswith("#")}


def test_write_is_atomic_0644_whatever_the_umask(textfile):
    old = os.umask(0o077)
    try:
        path = metrics.write(textfile, "a 1\n")
        first = os.stat(path).st_ino
        metrics.write(textfile, "a 2\n")
    finally:
        os.umask(old)
    assert path == textfile / "defender_setup.prom"
    assert path.read_text() == "a 2\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.stat(path).st_ino != first  # a new file renamed in, never rewritten in place
    assert sorted(os.listdir(textfile)) == ["defender_setup.prom"]  # no .tmp left


def test_a_link_planted_at_the_target_is_replaced_not_written_through(textfile, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (textfile / "defender_setup.prom").symlink_to(victim)
    path = metrics.write(textfile, "a 1\n")
    assert not path.is_symlink() and path.read_text() == "a 1\n"
    assert victim.read_text() == "precious"


def test_a_link_planted_at_the_temporary_name_is_not_followed(textfile, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (textfile / "defender_setup.prom.tmp").symlink_to(victim)
    dangling = tmp_path / "nowhere"
    metrics.write(textfile, "a 1\n")
    assert victim.read_text() == "precious"
    (textfile / "defender_setup.prom.tmp").symlink_to(dangling)  # would be created through
    metrics.write(textfile, "a 2\n")
    assert not dangling.exists() and (textfile / "defender_setup.prom").read_text() == "a 2\n"


def test_no_directory_no_file_and_nothing_created(run, sas_inputs, root):
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    before = snapshot(root)
    assert metrics.refresh(root) is False
    code, out, _ = run("metrics")
    assert code == 0 and "nothing written" in out and "prometheus-node-exporter" in out
    assert snapshot(root) == before


def test_a_linked_directory_inside_another_root_is_not_followed(root, tmp_path):
    outside = tmp_path / "outside"
    (outside / "node-exporter").mkdir(parents=True)
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/prometheus").symlink_to(outside)
    assert metrics.textfile_dir(root) is None
    assert metrics.refresh(root) is False and os.listdir(outside / "node-exporter") == []


@pytest.mark.allow_subprocess("promtool")
def test_every_writer_refreshes_them_when_it_ends(run, sas_inputs, cert_inputs, textfile):
    prom = textfile / "defender_setup.prom"
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    got = parsed(prom)
    assert got[f'defender_setup_info{{version="{__version__}",method="connection-string",'
               'origin="apply"}'] == 1
    assert got['defender_setup_last_change_result{result="unverified"}'] == 1
    assert got["defender_setup_rollbacks_total"] == 0
    assert os.stat(prom).st_mode & 0o777 == 0o644
    promtool(prom.read_text())

    assert run("apply", "--no-restart", *run.inputs(cert_inputs))[0] == 0
    got = parsed(prom)
    assert "defender_setup_certificate_expiry_timestamp_seconds" in got
    promtool(prom.read_text())

    assert run("rollback", "--no-restart")[0] == 0
    got = parsed(prom)
    assert got[f'defender_setup_info{{version="{__version__}",method="connection-string",'
               'origin="rollback"}'] == 1
    assert got["defender_setup_rollbacks_total"] == 1
    assert "defender_setup_certificate_expiry_timestamp_seconds" not in got
    text = prom.read_text()
    assert_no_secret(sas_inputs, text)
    assert_no_secret(cert_inputs, text)
    assert str(agent_path(run)) not in text and "dev1" not in text


@pytest.mark.allow_subprocess("promtool")
def test_the_command_prints_and_writes_what_prometheus_parses(run, cert_inputs, textfile):
    run("apply", "--no-restart", *run.inputs(cert_inputs))
    (textfile / "defender_setup.prom").unlink()
    code, out, _ = run("metrics", "--print")
    assert code == 0
    promtool(out)
    assert not (textfile / "defender_setup.prom").exists()  # --print writes nothing
    code, written, _ = run("metrics")
    assert code == 0 and written.startswith("wrote ")
    assert (textfile / "defender_setup.prom").read_text() == out
    assert "hub-auth" not in out and "hub-dns" not in out  # the network checks never run


@pytest.mark.allow_subprocess("fork")
def test_while_a_writer_holds_the_lock_it_writes_nothing_and_exits_0(run, sas_inputs,
                                                                      textfile):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    (textfile / "defender_setup.prom").unlink()
    with Holder(agent_path(run) / ".defender-setup/lock"):
        code, out, _ = run("metrics", "--lock-timeout", "0.1")
    assert code == 0 and out.startswith("nothing written: another command")
    assert os.listdir(textfile) == []


def test_a_file_it_cannot_write_is_one_warning_and_the_command_succeeds(
        run, sas_inputs, cert_inputs, textfile):
    (textfile / "defender_setup.prom").mkdir()  # the rename fails, even for root
    code, _, err = run("apply", "--no-restart", *run.inputs(sas_inputs))
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("defender-setup: warning: metrics not "
                                                   "written: cannot write")
    assert run("status")[0] == 0  # the credentials were written all the same


@pytest.mark.allow_subprocess("systemctl", "policy-rc.d", "promtool")
def test_a_verification_that_rolls_back_shows_in_the_metrics(booted_root, tmp_path,
                                                              monkeypatch):
    from tests.fakes import FakeSystemd, running
    from tests.functional.test_verify import KEY_A, KEY_B, verify, write_set

    textfile = booted_root / metrics.TEXTFILE_DIR
    textfile.mkdir(parents=True)
    write_set(booted_root, "good", KEY_A)
    write_set(booted_root, "bad", KEY_B)
    crash = [running("inv-1", pid=100), running("inv-1", pid=100),
             {**running("inv-1", pid=0), "SubState": "auto-restart",
              "ActiveState": "activating"}]
    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": crash}, {"states": [running("inv-2", pid=200)]}])
    from defender_setup.agentdir import AgentDir

    with AgentDir(booted_root).lock():  # as every command verifies: inside the writers' lock,
        assert verify(booted_root, fake, monkeypatch)[0] == 0  # whose release writes them
    got = parsed(textfile / "defender_setup.prom")
    assert got['defender_setup_last_verification_result{result="rolled_back"}'] == 1
    assert got['defender_setup_last_change_result{result="rolled_back"}'] == 1
    assert got["defender_setup_rollbacks_total"] == 1
    promtool((textfile / "defender_setup.prom").read_text())


def test_refreshed_once_per_command_at_the_outermost_release(run, sas_inputs, textfile):
    from defender_setup.agentdir import AgentDir

    run("apply", "--no-restart", *run.inputs(sas_inputs))
    prom = textfile / "defender_setup.prom"
    agent = AgentDir(run.root)
    with agent.lock(1):
        prom.unlink()
        agent.save_record("x.json", {})  # a nested hold: nothing written yet
        assert not prom.exists()
    assert prom.exists()  # the outermost release wrote it
