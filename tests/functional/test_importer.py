"""defender_setup.importer's run(): the offered files written, recorded, restarted and
verified on a throw-away root that looks booted (``root``), with a fake systemctl
first on PATH (tests/fakes.py)."""

import io
import os

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.errors import InputError, SetupError
from defender_setup.importer import PENDING, RECORD, check_offer, last_import, run
from defender_setup.offer import REJECTED_NOTE, _systemd_creds_decrypt
from defender_setup.service import Service
from tests.conftest import DEVICE, HUB, MODULE, snapshot
from tests.fakes import (
    FakeClock,
    FakeCreds,
    FakeJournal,
    FakeSystemd,
    failed,
    running,
    seal_set,
)
from tests.offers import CERT, CRED, CS, NAMES, X509, key_of, offered, sas


# -- run(): files, records and systemctl ---------------------------------------------------
def offer_credential(root, name, data: bytes):
    path = root / CRED / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Importer:
    def __init__(self, root, tmp_path, monkeypatch, states=None, restart_plan=None):
        self.root = root
        self.fake = FakeSystemd(tmp_path, states or [dict(running(), LoadState="loaded")],
                                restart_plan or [{}])
        self.fake.path_env(monkeypatch)

    def __call__(self, mode="no-restart"):
        out, clock = io.StringIO(), FakeClock()
        svc = Service(self.root, environ={}, journal=lambda: FakeJournal(), manages_root=True)
        try:
            code = run(self.root, mode, timeout=30, out=out, environ={}, service=svc,
                       clock=clock, sleep=clock.sleep)
        except SetupError as exc:
            out.write(f"error: {exc}\n")
            code = exc.exit_code
        return code, out.getvalue()


@pytest.fixture
def importer(booted_root, tmp_path, monkeypatch):
    return Importer(booted_root, tmp_path, monkeypatch)


pytestmark = pytest.mark.allow_subprocess("systemctl")  # the fake systemctl is a process


def test_nothing_offered_does_nothing(booted_root, importer):
    code, out = importer("boot")
    assert code == 0 and "nothing offered" in out
    assert not (booted_root / "var").exists() and importer.fake.calls() == []


def test_new_credential_is_written_with_its_origin_and_recorded(booted_root, importer):
    offer_credential(booted_root, NAMES[CS], sas())
    code, out = importer("no-restart")
    assert code == 0, out
    agent = AgentDir(booted_root)
    assert key_of(sas()).encode() in agent.current()[CS]
    assert agent.origin()["source"] == "credential"
    record = last_import(booted_root)
    assert record["result"] == "written" and record["source"] == "credential"
    assert record["identity"] == {"method": "connection-string", "hub": HUB,
                                  "device": DEVICE, "module": MODULE}
    assert record["from"] == {CS: str(booted_root / CRED / NAMES[CS])}
    assert key_of(sas()) not in out + str(record)


def test_equal_set_writes_and_restarts_nothing(booted_root, importer):
    offer_credential(booted_root, NAMES[CS], sas())
    importer("no-restart")
    before = snapshot(booted_root / "var")
    offer_credential(booted_root, NAMES[CS], b"\xef\xbb\xbf  " + sas() + b"\r\n")  # same, as pasted
    code, out = importer("boot")
    assert code == 0 and "nothing written, nothing restarted" in out
    assert snapshot(booted_root / "var") == before  # not even the record
    assert importer.fake.calls() == []


def test_an_interrupted_update_is_completed_first_and_said_once(booted_root, importer):
    """An update left half done (a crash while staging) is completed under the import's lock
    before the new set is written, with one line in the import's own voice."""
    offer_credential(booted_root, NAMES[CS], sas())
    importer("no-restart")
    agent = AgentDir(booted_root)
    (agent.state / "staging").mkdir()
    (agent.state / "staging" / CS).write_bytes(b"half")
    offer_credential(booted_root, NAMES[CS], sas(seed=2))
    code, out = importer("no-restart")
    assert code == 0, out
    assert out.count("defender-setup import: repaired: an interrupted credential update was "
                     "completed\n") == 1, out
    assert key_of(sas(seed=2)).encode() in agent.current()[CS]
    assert key_of(sas()).encode() in agent.previous_files()[CS]
    assert not agent.pending() and not (agent.state / "staging").exists()


def test_invalid_credential_changes_nothing_and_is_recorded(booted_root, importer):
    offer_credential(booted_root, NAMES[CS], sas(1))
    importer("no-restart")
    files_before = AgentDir(booted_root).current()
    wrong = sas(2).replace(b"SharedAccessKey=", b"SharedAccessKey=!")
    offer_credential(booted_root, NAMES[CS], wrong)
    code, out = importer("boot")
    assert code == 65
    assert out.count("\n") == 1 and "credential defender-setup.connection-string: " \
        "SharedAccessKey: is not valid base64" in out and "nothing was changed" in out
    assert AgentDir(booted_root).current() == files_before and importer.fake.calls() == []
    record = last_import(booted_root)
    assert record["result"] == "invalid" and "SharedAccessKey" in record["message"]
    assert key_of(wrong)[1:] not in out + str(record)


def test_boot_mode_queues_the_restart_and_never_waits_for_it(booted_root, importer):
    offer_credential(booted_root, NAMES[CS], sas())
    code, out = importer("boot")
    assert code == 0, out
    calls = importer.fake.calls()
    assert "--no-block restart defender-iot-micro-agent.service" in calls
    assert not any(c.startswith("restart") for c in calls)  # a synchronous restart deadlocks
    assert AgentDir(booted_root).record(PENDING) is not None
    assert "defender-setup-import-verify.service verifies" in out


def test_boot_verify_without_a_pending_import_does_nothing(booted_root, importer):
    assert importer("boot-verify") == (0, "")
    assert importer.fake.calls() == []


def test_boot_verify_keeps_a_healthy_set_and_clears_the_drop_folder(booted_root, importer):
    folder = booted_root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(sas())
    assert importer("boot")[0] == 0
    assert (folder / CS).exists()  # kept until the agent has accepted it
    code, out = importer("boot-verify")
    assert code == 0, out
    assert "active (running), stable for" in out
    assert not (folder / CS).exists() and "removed connection_string.txt" in out
    assert last_import(booted_root)["result"] == "verified"
    assert AgentDir(booted_root).record(PENDING) is None
    assert not any(c.startswith("restart") for c in importer.fake.calls())  # watched only


def good_then_refused(root, tmp_path, monkeypatch) -> Importer:
    """sas(1) imported, then sas(2) offered to an agent that the hub refuses (exit 76)."""
    offer_credential(root, NAMES[CS], sas(1))
    (tmp_path / "a").mkdir()
    Importer(root, tmp_path / "a", monkeypatch)("no-restart")
    offer_credential(root, NAMES[CS], sas(2))
    (tmp_path / "b").mkdir()
    return Importer(root, tmp_path / "b", monkeypatch,
                    states=[dict(failed(status=76), LoadState="loaded")],
                    restart_plan=[{"states": [dict(running(inv="inv-3"), LoadState="loaded")]}])


def test_boot_verify_rolls_back_a_refused_set(booted_root, tmp_path, monkeypatch):
    imp = good_then_refused(booted_root, tmp_path, monkeypatch)
    assert imp("boot")[0] == 0
    code, out = imp("boot-verify")
    assert code == 69, out
    assert "VERIFICATION FAILED" in out and "rolled back to the previous credentials" in out
    assert key_of(sas(1)).encode() in AgentDir(booted_root).current()[CS]
    assert len(imp.fake.restarts()) == 1  # the roll-back's one restart
    assert last_import(booted_root)["result"] == "rejected"
    assert key_of(sas(2)) not in out


def test_a_refused_first_set_leaves_the_device_unconfigured(booted_root, importer, monkeypatch,
                                                            tmp_path):
    folder = booted_root / "boot/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(sas(3))
    (tmp_path / "c").mkdir()
    imp = Importer(booted_root, tmp_path / "c", monkeypatch,
                   states=[dict(failed(status=76), LoadState="loaded")])
    assert imp("boot")[0] == 0
    code, out = imp("boot-verify")
    assert code == 69, out
    assert AgentDir(booted_root).current() == {}
    assert "reset-failed defender-iot-micro-agent.service" in imp.fake.calls()
    assert imp.fake.restarts() == []
    note = (folder / REJECTED_NOTE).read_text()
    assert "refused" in note and key_of(sas(3)) not in note
    assert (folder / CS).exists()  # a rejected set stays where it was put


def test_invalid_drop_folder_gets_a_note_and_keeps_its_files(booted_root, importer):
    folder = booted_root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(X509)
    code, out = importer("boot")
    assert code == 65
    assert f"{folder / CERT}: is missing" in out
    assert (folder / CS).exists() and "is missing" in (folder / REJECTED_NOTE).read_text()
    assert not (booted_root / "var/defender_iot_micro_agent" / CS).exists()


def configured_then_offered_in_a_folder(root, importer):
    """sas() imported from a credential, then the same set put in the drop folder."""
    offer_credential(root, NAMES[CS], sas())
    importer("no-restart")
    os.unlink(root / CRED / NAMES[CS])
    folder = root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(sas())
    return folder


def test_equal_drop_folder_set_is_removed_from_the_boot_partition(booted_root, importer):
    folder = configured_then_offered_in_a_folder(booted_root, importer)
    code, out = importer("boot")
    assert code == 0 and not (folder / CS).exists(), out


def test_manual_import_restarts_once_and_verifies(booted_root, tmp_path, monkeypatch):
    offer_credential(booted_root, NAMES[CS], sas())
    imp = Importer(booted_root, tmp_path, monkeypatch,
                   restart_plan=[{"states": [dict(running(inv="inv-2"), LoadState="loaded")]}])
    code, out = imp("manual")
    assert code == 0, out
    assert len(imp.fake.restarts()) == 1
    assert last_import(booted_root)["result"] == "verified"


def test_masked_agent_is_not_restarted_nor_rolled_back(booted_root, tmp_path, monkeypatch):
    offer_credential(booted_root, NAMES[CS], sas())
    imp = Importer(booted_root, tmp_path, monkeypatch, states=[{"LoadState": "masked"}])
    code, out = imp("manual")
    assert code == 0 and "is masked" in out
    assert imp.fake.restarts() == [] and AgentDir(booted_root).current()


def test_no_systemd_writes_only(booted_root, importer):
    os.rmdir(booted_root / "run/systemd/system")
    offer_credential(booted_root, NAMES[CS], sas())
    code, out = importer("boot")
    assert code == 0 and "restart skipped: systemd is not running" in out
    assert importer.fake.calls() == [] and AgentDir(booted_root).current()


def test_record_is_private(booted_root, importer):
    offer_credential(booted_root, NAMES[CS], b"")
    importer("boot")
    path = booted_root / "var/defender_iot_micro_agent/.defender-setup" / RECORD
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_status_and_check_show_the_origin_and_the_last_import(booted_root, importer, capsys):
    import json

    from defender_setup import cli

    offer_credential(booted_root, NAMES[CS], sas())
    importer("no-restart")
    offer_credential(booted_root, NAMES[CS], b"HostName=x")
    importer("boot")
    assert cli.main(["status", "--json", "--root", str(booted_root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["origin"]["source"] == "credential"
    assert report["last_import"]["result"] == "invalid"
    assert cli.main(["check", "--json", "--offline", "--root", str(booted_root)]) == 65
    checks = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["last-import"]["status"] == "error"
    assert "credential defender-setup.connection-string" in checks["last-import"]["message"]
    assert checks["credentials-valid"]["status"] == "ok"  # the configured set is untouched


def test_an_oversized_credential_is_refused_and_recorded_without_reading_it_all(booted_root,
                                                                              importer):
    offer_credential(booted_root, NAMES[CS], b"HostName=" + b"x" * 2_000_000)
    code, out = importer("boot")
    assert code == 65 and "at most" in out and out.count("\n") == 1
    assert last_import(booted_root)["result"] == "invalid"
    assert not (booted_root / "var/defender_iot_micro_agent" / CS).exists()


def test_a_failed_import_superseded_by_a_later_apply_is_a_warning(booted_root, importer, capsys):
    import json

    from defender_setup import cli

    offer_credential(booted_root, NAMES[CS], b"garbage")
    assert importer("boot")[0] == 65
    # Right after (the records' times are compared as times, below the second)
    AgentDir(booted_root).write(check_offer(offered(sas())).validated.files, origin="apply")
    assert cli.main(["check", "--json", "--offline", "--root", str(booted_root)]) == 0
    check = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["last-import"]
    assert check["status"] == "warning" and "since configured by apply" in check["message"]


@pytest.mark.allow_subprocess("systemd-creds")
def test_a_sealed_set_is_compared_decrypted_and_stays_sealed(booted_root, importer,
                                                              tmp_path, monkeypatch):
    """An unchanged offer leaves a sealed set alone; a new one is sealed too (here, in a
    throw-away root, that is deferred to the first boot like in an image)."""
    from defender_setup import sealing
    from defender_setup.credentials import validate

    FakeCreds(tmp_path).path_env(monkeypatch)
    seal_set(booted_root, validate("connection-string", sas(1)))
    offer_credential(booted_root, NAMES[CS], sas(1))
    for _boot in range(2):
        code, out = importer("boot")
        assert code == 0 and "nothing written" in out
        assert set(AgentDir(booted_root).current()) == {CS + ".cred"}
    offer_credential(booted_root, NAMES[CS], sas(2))
    code, out = importer("no-restart")
    assert code == 0, out
    assert AgentDir(booted_root).record(sealing.PENDING) is not None


def test_a_refused_offer_is_not_imported_again_at_the_next_boot(booted_root, tmp_path,
                                                                 monkeypatch, capsys):
    """The same refused offer at every boot was written, started, refused and rolled back
    each time (two restarts a boot). Now the next boot writes and restarts nothing, says
    why, and check keeps the refusal an error; 'import' by hand tries it again."""
    import json

    from defender_setup import cli

    imp = good_then_refused(booted_root, tmp_path, monkeypatch)
    assert imp("boot")[0] == 0 and imp("boot-verify")[0] == 69
    state = {p: p.stat().st_mtime_ns for p in (booted_root / "var").rglob("*")}
    restarts = len(imp.fake.restarts())

    code, out = imp("boot")  # the next boot, the same offer
    assert code == 0 and "not imported again at boot" in out, out
    assert len(imp.fake.restarts()) == restarts and "restart" not in imp.fake.calls()[-1:]
    assert {p: p.stat().st_mtime_ns for p in (booted_root / "var").rglob("*")} == state
    assert key_of(sas(1)).encode() in AgentDir(booted_root).current()[CS]
    assert cli.main(["check", "--json", "--offline", "--root", str(booted_root)]) != 0
    check = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["last-import"]
    assert check["status"] == "error" and "not imported again at boot" in check["message"]

    code, out = imp("manual")  # by hand: tried again
    assert "VERIFICATION FAILED" in out and len(imp.fake.restarts()) > restarts


# -- the drop folder is hostile -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_an_unreadable_drop_folder_file_leaves_a_note_and_is_recorded(booted_root, importer,
                                                                      kind):
    folder = booted_root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(folder / CS)
    else:
        (folder / CS).write_bytes(b"HostName=" + b"x" * 2_000_000)
    code, out = importer("boot")
    assert code == (66 if kind == "fifo" else 65), out
    last = last_import(booted_root)
    assert last["source"] == "drop-folder" and last["from"] == {CS: str(folder / CS)}, last
    assert str(folder / CS) in (folder / REJECTED_NOTE).read_text()


def test_root_tree_with_boot_linked_to_the_hosts_is_refused(booted_root, importer, tmp_path):
    host_folder = tmp_path / "host-boot/defender-setup"
    host_folder.mkdir(parents=True)
    (host_folder / CS).write_bytes(sas())
    (booted_root / "boot").symlink_to(tmp_path / "host-boot")
    code, out = importer("no-restart")
    assert code == 77 and "symbolic link" in out, out
    assert (host_folder / CS).read_bytes() == sas()
    assert sorted(p.name for p in host_folder.iterdir()) == [CS]  # no note written there
    assert not (booted_root / "var/defender_iot_micro_agent" / CS).exists()


def test_root_tree_credential_linked_to_the_hosts_is_refused(booted_root, importer, tmp_path):
    host_key = tmp_path / "host-credstore/defender-setup.connection-string"
    host_key.parent.mkdir()
    host_key.write_bytes(sas())
    (booted_root / "etc/credstore").mkdir(parents=True)
    (booted_root / "etc/credstore/defender-setup.connection-string").symlink_to(host_key)
    code, out = importer("no-restart")
    assert code == 77 and "symbolic link" in out, out
    assert not (booted_root / "var/defender_iot_micro_agent" / CS).exists()


def test_a_drop_folder_that_cannot_be_emptied_is_a_recorded_failure(booted_root, importer):
    """A read-only boot partition: the configured set is kept, but the offered files stay
    readable there, which the record and ``check`` must show (not 'unchanged')."""
    folder = configured_then_offered_in_a_folder(booted_root, importer)
    (folder / REJECTED_NOTE / "x").mkdir(parents=True)  # cannot be unlinked: clearing fails
    code, out = importer("boot")
    assert code == 73, out
    last = last_import(booted_root)
    assert last["result"] == "failed" and "cannot remove" in last["message"], last
    assert last["source"] == "drop-folder"


# -- offer: a credstore.encrypted credential decrypted by systemd-creds ------------------
def fake_systemd_creds(tmp_path, monkeypatch, script: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemd-creds").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "systemd-creds").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.allow_subprocess("systemd-creds")
def test_systemd_creds_decrypts_into_a_pipe(tmp_path, monkeypatch):
    # the name and the path as arguments, the plaintext on its standard output
    fake_systemd_creds(tmp_path, monkeypatch, f'echo "$*" > {tmp_path}/argv; printf plain')
    assert _systemd_creds_decrypt("defender-setup.x", tmp_path / "x") == b"plain"
    assert (tmp_path / "argv").read_text() == f"decrypt --name=defender-setup.x {tmp_path}/x -\n"


@pytest.mark.allow_subprocess("systemd-creds")
def test_a_credential_that_does_not_decrypt_is_named_with_systemd_creds_reason(
        tmp_path, monkeypatch):
    fake_systemd_creds(tmp_path, monkeypatch,
                       'echo "Failed to decrypt: incorrect key?" >&2; echo >&2; exit 1')
    with pytest.raises(InputError) as caught:
        _systemd_creds_decrypt("defender-setup.x", tmp_path / "x")
    assert str(caught.value) == (f"credential defender-setup.x: cannot decrypt {tmp_path / 'x'}"
                                 ": Failed to decrypt: incorrect key?; encrypt it on this "
                                 "machine (systemd-creds encrypt --name=defender-setup.x)")
