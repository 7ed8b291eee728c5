"""defender_setup.agentdir: private, atomic set writes, generations, refusal of unsafe targets."""

import json
import os
import shutil
import stat

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.credentials import ALL_FILES
from defender_setup.errors import InputError, SetupError, UnsafeTargetError, ValidationError
from defender_setup.provision import read

CS, CERT, KEY = "connection_string.txt", "certificate_public.pem", "certificate_private.pem"


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_creates_a_private_directory_and_private_files(root, sas_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    assert mode(agent.path) == 0o700
    assert mode(agent.path / CS) == 0o600
    assert agent.method() == "connection-string"
    assert agent.current()[CS].endswith(b"\n")
    assert sorted(os.listdir(agent.path)) == [".defender-setup", CS]


def test_files_are_private_and_parents_0755_whatever_the_umask(root, sas_inputs):
    old = os.umask(0)
    try:
        AgentDir(root).write(sas_inputs.validated().files)
    finally:
        os.umask(old)
    assert mode(AgentDir(root).path / CS) == 0o600
    assert mode(AgentDir(root).path) == 0o700 and mode(AgentDir(root).state) == 0o700
    assert mode(root) == 0o755 and mode(root / "var") == 0o755  # not 0777


def test_switching_method_removes_the_other_methods_files(root, sas_inputs, cert_inputs):
    agent = AgentDir(root)
    agent.write(cert_inputs.validated().files)
    assert set(agent.current()) == {CS, CERT, KEY}
    assert mode(agent.path / KEY) == 0o600 and mode(agent.path / CERT) == 0o644
    agent.write(sas_inputs.validated().files)
    assert set(agent.current()) == {CS}
    agent.write(cert_inputs.validated().files)
    assert set(agent.current()) == {CS, CERT, KEY}


def test_rollback_restores_the_previous_set_and_toggles(root, sas_inputs, cert_inputs):
    agent = AgentDir(root)
    first, second = sas_inputs.validated().files, cert_inputs.validated().files
    agent.write(first)
    agent.write(second)
    agent.rollback()
    assert agent.current() == {name: data for name, (data, _) in first.items()}
    agent.rollback()
    assert agent.current() == {name: data for name, (data, _) in second.items()}
    assert mode(agent.path / KEY) == 0o600


def test_rollback_without_a_previous_generation_is_an_input_error(root, sas_inputs):
    agent = AgentDir(root)
    with pytest.raises(InputError):
        agent.rollback()
    agent.write(sas_inputs.validated().files)
    with pytest.raises(InputError, match="unconfigured before"):
        agent.rollback()
    assert not agent.has_previous()


def test_refuses_a_symlinked_target_and_leaves_everything_alone(root, tmp_path, sas_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    before = agent.current()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    os.link(agent.path / CS, tmp_path / "keep")   # keep the content; replace with a link
    (agent.path / CS).unlink()
    (agent.path / CS).symlink_to(elsewhere)
    with pytest.raises(UnsafeTargetError, match="symbolic link") as info:
        agent.write(sas_inputs.validated().files)
    assert info.value.exit_code == 77
    assert elsewhere.read_bytes() == b""
    assert (tmp_path / "keep").read_bytes() == before[CS]


def test_refuses_a_symlinked_directory(root, tmp_path, sas_inputs):
    target = tmp_path / "attacker"
    target.mkdir(mode=0o700)
    (root / "var").mkdir(parents=True)
    (root / "var" / "defender_iot_micro_agent").symlink_to(target)
    with pytest.raises(UnsafeTargetError, match="not a real directory"):
        AgentDir(root).write(sas_inputs.validated().files)
    assert os.listdir(target) == []


def test_refuses_a_directory_writable_by_others(root, sas_inputs):
    agent = AgentDir(root)
    agent.path.mkdir(parents=True)
    os.chmod(agent.path, 0o777)
    with pytest.raises(UnsafeTargetError, match="writable by group or others"):
        agent.write(sas_inputs.validated().files)


def test_refuses_a_target_that_is_not_a_regular_file(root, sas_inputs):
    agent = AgentDir(root)
    (agent.path / CS).mkdir(parents=True)
    os.chmod(agent.path, 0o700)
    with pytest.raises(UnsafeTargetError, match="not a regular file"):
        agent.write(sas_inputs.validated().files)


def test_a_readable_directory_is_tightened_to_0700(root, sas_inputs):
    agent = AgentDir(root)
    agent.path.mkdir(parents=True, mode=0o755)
    agent.write(sas_inputs.validated().files)
    assert mode(agent.path) == 0o700


def test_repair_discards_an_uncommitted_write(root, sas_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    before = agent.current()
    (agent.state / "staging").mkdir()
    (agent.state / "staging" / CS).write_bytes(b"half")
    assert agent.repair() is True
    assert agent.current() == before and not (agent.state / "staging").exists()


def test_repair_rolls_a_committed_write_forward(root, sas_inputs, cert_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    new = cert_inputs.validated().files
    staging = agent.state / "staging"
    staging.mkdir()
    for name, (data, file_mode) in new.items():
        (staging / name).write_bytes(data)
        os.chmod(staging / name, file_mode)
    (agent.state / "txn").write_text(json.dumps({"files": [CS, CERT, KEY]}))
    assert agent.pending()
    assert agent.repair() is True
    assert agent.current() == {name: data for name, (data, _) in new.items()}
    assert not agent.pending()


def test_modes_and_unconfigure(root, sas_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    assert agent.modes()[str(agent.path / CS)] == 0o600
    agent.unconfigure()
    assert agent.current() == {} and agent.method() is None


def test_origin_is_recorded_with_the_set_and_never_left_stale(root, sas_inputs, cert_inputs):
    agent = AgentDir(root)
    assert agent.origin() is None
    agent.write(sas_inputs.validated().files, origin={"source": "drop-folder", "path": "/boot"})
    assert agent.origin()["source"] == "drop-folder" and agent.origin()["path"] == "/boot"
    agent.write(cert_inputs.validated().files)  # a writer that says nothing: "unknown", not stale
    assert agent.origin()["source"] == "unknown"
    assert mode(agent.state / "origin.json") == 0o600


def test_origin_switches_with_the_set_in_one_transaction(root, sas_inputs, cert_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files, origin="apply")
    staging = agent.state / "staging"
    staging.mkdir()
    for name, (data, file_mode) in cert_inputs.validated().files.items():
        (staging / name).write_bytes(data)
        os.chmod(staging / name, file_mode)
    (staging / "origin.json").write_text('{"source": "credential", "time": "t"}')
    # killed before the commit point: the old set and its origin stay
    assert agent.repair() and agent.origin()["source"] == "apply"
    staging.mkdir()
    for name, (data, _) in cert_inputs.validated().files.items():
        (staging / name).write_bytes(data)
    (staging / "origin.json").write_text('{"source": "credential", "time": "t"}')
    (agent.state / "txn").write_text(json.dumps({"files": [CS, CERT, KEY],
                                                 "origin": "origin.json"}))
    # killed after it: rolled forward, origin included
    assert agent.repair() and agent.origin() == {"source": "credential", "time": "t"}
    assert agent.method() == "certificate"


def files_of(validated):
    return {name: data for name, (data, _) in validated.files.items()}


def tree(root):
    """Every path under root with what a change would alter: 'nothing changed' made checkable
    (the lock file aside: a writer taking the lock writes its pid there)."""
    seen = {}
    for base, dirs, names in os.walk(root):
        for name in dirs + [n for n in names if n != "lock"]:
            st = os.lstat(os.path.join(base, name))
            seen[os.path.relpath(os.path.join(base, name), root)] = (
                st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns)
    return seen


def test_rollback_restores_the_documented_modes(root, sas_inputs, cert_inputs):
    agent = AgentDir(root)
    agent.write(cert_inputs.validated().files)
    os.chmod(agent.path / KEY, 0o640)          # loosened by hand
    os.chmod(agent.path / CERT, 0o600)
    agent.write(sas_inputs.validated().files)
    os.chmod(agent.path / CS, 0o644)
    agent.rollback()
    assert (mode(agent.path / CS), mode(agent.path / CERT), mode(agent.path / KEY)) == \
        (0o600, 0o644, 0o600)
    agent.rollback()
    assert mode(agent.path / CS) == 0o600


def test_rollback_refuses_an_invalid_previous_set_and_changes_nothing(root, sas_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    agent.write(sas_inputs.validated().files)
    (agent.state / "previous" / CS).write_bytes(b"HostName=x;DeviceId=d\n")  # same inode
    before = tree(root)
    with pytest.raises(ValidationError) as err:
        agent.rollback()
    assert err.value.exit_code == 65 and "nothing was restored" in str(err.value)
    assert tree(root) == before


@pytest.mark.parametrize("plant", ["hard link", "fifo", "foreign owner"])
def test_rollback_refuses_a_planted_previous_file_and_changes_nothing(root, tmp_path, sas_inputs,
                                                                      plant):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    agent.write(sas_inputs.validated().files)
    target = agent.state / "previous" / CS
    outside = tmp_path / "outside"
    if plant == "hard link":   # a valid connection string, but not the one that was kept
        outside.write_bytes(agent.current()[CS])
        target.unlink()
        os.link(outside, target)
    elif plant == "fifo":
        target.unlink()
        os.mkfifo(target, 0o600)
    else:
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(target, 1, 1)
    before = tree(root)
    with pytest.raises(UnsafeTargetError) as err:
        agent.rollback()
    assert err.value.exit_code == 77 and str(target) in str(err.value)
    assert tree(root) == before


def test_written_sets_leave_single_links_so_rollback_is_not_refused(root, sas_inputs,
                                                                    cert_inputs):
    agent = AgentDir(root)
    for files in (sas_inputs, cert_inputs, cert_inputs, sas_inputs):
        agent.write(files.validated().files)
        for directory in (agent.path, agent.state / "previous"):
            for name in ALL_FILES:
                if (directory / name).exists():
                    assert os.lstat(directory / name).st_nlink == 1, directory / name
    agent.rollback()
    agent.rollback()
    assert agent.current() == files_of(sas_inputs.validated())


@pytest.mark.parametrize("name", ["previous", "staging", "previous.new", "txn", "lock",
                                  "origin.json"])
def test_a_symlink_in_the_private_state_is_refused_naming_it(root, tmp_path, sas_inputs, name):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = agent.state / name
    if link.is_dir():
        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    link.symlink_to(elsewhere)
    before = tree(root)
    for action in (lambda: agent.write(sas_inputs.validated().files), agent.rollback,
                   agent.repair, agent.check, lambda: read(agent)):
        with pytest.raises(UnsafeTargetError) as err:
            action()
        assert err.value.exit_code == 77 and str(link) in str(err.value)
    assert tree(root) == before and os.listdir(elsewhere) == []


def test_a_symlinked_var_under_root_is_refused_not_followed(root, tmp_path, sas_inputs):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "var").symlink_to(elsewhere)
    agent = AgentDir(root)
    for action in (lambda: agent.write(sas_inputs.validated().files), agent.check):
        with pytest.raises(UnsafeTargetError, match="var is not a real directory") as err:
            action()
        assert err.value.exit_code == 77
    assert os.listdir(elsewhere) == []


def test_an_explicit_previous_set_replaces_the_previous_generation(root, sas_inputs,
                                                                    cert_inputs):
    agent = AgentDir(root)
    agent.write(sas_inputs.validated().files)
    agent.write(sas_inputs.validated().files)  # previous: hard links of the first set
    old = {CS: (b"sealed stand-in\n", 0o600)}
    agent.write(cert_inputs.validated().files, origin="apply", previous=old)
    previous = agent.state / "previous"
    assert sorted(os.listdir(previous)) == [CS]
    assert (previous / CS).read_bytes() == b"sealed stand-in\n" and mode(previous / CS) == 0o600
    assert os.lstat(previous / CS).st_nlink == 1
    assert set(agent.current()) == {CS, CERT, KEY} and agent.origin()["source"] == "apply"
    with pytest.raises(SetupError, match="unexpected file set"):
        agent.write(sas_inputs.validated().files, previous={"other.txt": (b"x", 0o600)})
