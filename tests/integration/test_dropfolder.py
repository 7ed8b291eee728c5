"""The boot partition's drop folder is hostile: what is put there cannot make the import, run
by the real defender-setup-import.service as root, write anywhere else.

One booted container per test (the release of ``suite``), the .deb installed unconfigured.
"""

from __future__ import annotations

import pytest
from fleetlib import (
    AGENT_DIR,
    IMPORT,
    VERIFY,
    checks,
    failed_units,
    journal,
    key,
    sas_string,
    status_json,
    wait_for,
)

FOLDER = "/boot/defender-setup"
NOTE = f"{FOLDER}/defender-setup.rejected.txt"
MOTD = "a file of the administrator's\n"


@pytest.fixture
def ct(booted):
    booted.install_deb()
    assert failed_units(booted) == []
    return booted


def start_import(ct) -> int:
    return ct.run(["timeout", "60", "systemctl", "restart", IMPORT], check=False).returncode


def test_a_link_planted_in_the_drop_folder_is_not_written_through(ct):
    """An invalid offer makes the import leave a note; a symbolic link planted at the note's
    temporary name must not lead that write to /etc/motd."""
    ct.copy_in(MOTD, "/etc/motd", mode=0o644)
    ct.sh(f"mkdir -p {FOLDER}; printf garbage > {FOLDER}/connection_string.txt; "
          f"ln -s /etc/motd {NOTE}.tmp")
    assert start_import(ct) != 0
    assert ct.read("/etc/motd") == MOTD, journal(ct, "-u", IMPORT)
    assert ct.run(["test", "-L", "/etc/motd"], check=False).returncode != 0
    assert "connection_string.txt" in ct.read(NOTE)  # the note is still left, beside the set
    assert ct.run(["test", "-L", NOTE], check=False).returncode != 0
    assert failed_units(ct) == [IMPORT]
    assert ct.show(IMPORT, "ExecMainStatus")["ExecMainStatus"] == "65"


def test_hard_links_survive_and_a_read_only_folder_is_a_recorded_failure(ct):
    """An administrator's copy hard-linked into the folder keeps its content when the folder
    is emptied; a folder that cannot be emptied (a read-only /boot) is a failure that
    ``check`` reports, not an 'unchanged' import."""
    text = sas_string("drop-1", key(41))
    ct.copy_in(text, "/root/admin-copy")
    ct.sh(f"mkdir -p {FOLDER}; ln /root/admin-copy {FOLDER}/connection_string.txt")
    assert start_import(ct) == 0, journal(ct, "-u", IMPORT)
    # the hub is unreachable here: the agent runs and retries, which is a healthy verdict
    assert wait_for(lambda: status_json(ct)["last_import"]["result"] == "verified"), \
        journal(ct, "-u", IMPORT, "-u", VERIFY)
    assert ct.run(["ls", "-A", FOLDER]).stdout == ""
    assert ct.read("/root/admin-copy") == text  # unlinked from the folder, never zeroed

    ct.copy_in(text, f"{FOLDER}/connection_string.txt")  # offered again: unchanged
    ct.run(["mount", "--bind", "-o", "ro", FOLDER, FOLDER])
    code = start_import(ct)
    log = journal(ct, "-u", IMPORT)
    assert code != 0 and "Read-only file system" in log, log
    last = status_json(ct)["last_import"]
    assert last["result"] == "failed" and "Read-only file system" in last["message"], last
    assert checks(ct)["last-import"]["status"] == "error"
    assert ct.exists(f"{AGENT_DIR}/connection_string.txt")  # the identity itself stays
