"""defender_setup.facts: the public, non-secret facts about the stored set."""

import json
import os

from defender_setup import facts
from defender_setup.agentdir import AgentDir
from defender_setup.credentials import validate

KEY = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="  # test-only dummy key


def store(root, origin="apply"):
    text = f"HostName=hub.example.net;DeviceId=dev;ModuleId=M;SharedAccessKey={KEY}"
    AgentDir(root).write(validate("connection-string", text).files, origin=origin)


def test_a_write_records_origin_and_an_unjudged_change_readable_by_all(tmp_path):
    store(tmp_path, "debconf")
    path = tmp_path / facts.FACTS
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755"
    known = facts.read(tmp_path)
    assert known.origin == "debconf"
    assert known.last_change["origin"] == "debconf"
    assert known.last_change["result"] == "written"
    assert known.last_verification is None
    assert KEY not in path.read_text()


def test_a_verdict_judges_the_pending_change_once(tmp_path):
    store(tmp_path, "apply")
    change = facts.pending_change(tmp_path)
    facts.settled(tmp_path, "healthy", change)
    known = facts.read(tmp_path)
    assert known.last_change == dict(change, result="verified")
    assert known.last_verification["result"] == "verified"
    assert facts.pending_change(tmp_path) is None
    facts.settled(tmp_path, "failed", None)  # a later restart judges no change
    again = facts.read(tmp_path)
    assert again.last_change["result"] == "verified"
    assert again.last_verification["result"] == "failed"


def test_a_roll_back_by_the_verification_keeps_the_judged_change(tmp_path):
    store(tmp_path, "apply")
    store(tmp_path, "drop-folder")
    change = facts.pending_change(tmp_path)
    AgentDir(tmp_path).rollback()  # what verify.settle does on a failure
    facts.settled(tmp_path, "rolled back", change)
    known = facts.read(tmp_path)
    assert known.origin == "rollback"
    assert known.last_change["origin"] == "drop-folder"
    assert known.last_change["result"] == "rolled-back"


def test_a_skipped_verification_records_nothing(tmp_path):
    store(tmp_path)
    before = (tmp_path / facts.FACTS).read_bytes()
    facts.settled(tmp_path, "skipped", facts.pending_change(tmp_path))
    assert (tmp_path / facts.FACTS).read_bytes() == before


def test_read_keeps_only_enumerated_words_and_times(tmp_path):
    path = tmp_path / facts.FACTS
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "origin": f"SharedAccessKey={KEY}",
        "lastChange": {"time": "2026-01-02T03:04:05Z", "origin": "apply", "result": KEY},
        "lastVerification": {"time": KEY, "result": "verified"}}))
    assert facts.read(tmp_path) == facts.Facts()


def test_read_refuses_what_is_not_a_small_regular_file(tmp_path):
    path = tmp_path / facts.FACTS
    path.parent.mkdir(parents=True)
    os.mkfifo(path)  # would block a plain open()
    assert facts.read(tmp_path) == facts.Facts()
    path.unlink()
    path.write_bytes(b" " * (facts.MAX_BYTES + 1))
    assert facts.read(tmp_path) == facts.Facts()
    path.unlink()
    (tmp_path / "elsewhere.json").write_text('{"origin": "apply"}')
    path.symlink_to(tmp_path / "elsewhere.json")
    assert facts.read(tmp_path) == facts.Facts()


def test_a_planted_link_is_not_written_through(tmp_path):
    target = tmp_path / "outside"
    target.mkdir()
    (tmp_path / "var/lib").mkdir(parents=True)
    (tmp_path / "var/lib/defender-setup").symlink_to(target)
    store(tmp_path)  # the credential write itself succeeds: the facts are best effort
    assert list(target.iterdir()) == []
    assert AgentDir(tmp_path).method() == "connection-string"


def test_readable_by_the_agent_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        store(tmp_path)
    finally:
        os.umask(old)
    assert oct((tmp_path / "var/lib/defender-setup").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / facts.FACTS).stat().st_mode & 0o777) == "0o644"
