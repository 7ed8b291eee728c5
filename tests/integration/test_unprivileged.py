"""The unprivileged agent and sealed credentials, installed from the .deb in booted containers.

- Debian 11, 12, 13 (the ``suite`` fixture: Debian 12 in make test, all three in
  make test-full): the agent runs as a dynamic user (uid not 0) that cannot list or read
  the agent directory, gets its identity through LoadCredential=, and the files keep their
  root-only modes; the unit's exposure is at most 1.5. Debian 11 refuses ``--seal``.
- Debian 12, 13: a sealed set (debconf answer, then apply/rollback/unseal/seal, a method
  switch) holds no key material in either generation; copied into another container (another
  host key) it does not decrypt, and ``check`` and ``restart`` say so; purge removes it all.
- An image built with sealing asked for is sealed at its first boot, with its own key, and
  stays sealed and working across a reboot.
No secret may appear in argv, the environment, the journal or a world-readable file.
"""

from __future__ import annotations

import re
from pathlib import Path

import harness
import pytest
from conftest import AGENT_DIR, UNIT
from test_package import VERDICT, key_body, put_identity, reconfigure
from test_package_image import wait_active
from test_service import exposure

CREDS = f"/run/credentials/{UNIT}"
SEAL = ("defender-setup defender-setup/seal-credentials boolean true",)


def out_of(result) -> str:
    return result.stdout + result.stderr


def agent_process(ct) -> tuple[int, int, int]:
    """(pid, uid, gid) of the agent's main process."""
    pid = int(ct.show(UNIT, "MainPID")["MainPID"])
    status = ct.read(f"/proc/{pid}/status")
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M).group(1))
    return pid, uid, gid


def assert_unprivileged(ct, secrets) -> None:
    pid, uid, gid = agent_process(ct)
    assert pid and uid != 0 and gid != 0
    as_agent = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    listing = ct.run([*as_agent, "ls", AGENT_DIR], check=False)
    assert listing.returncode != 0 and "Permission denied" in listing.stderr, out_of(listing)
    for name in ("connection_string.txt", "connection_string.txt.cred",
                 "certificate_private.pem", "certificate_private.pem.cred"):
        assert ct.run([*as_agent, "cat", f"{AGENT_DIR}/{name}"], check=False).returncode != 0
    # Inside its own mount namespace the directory is not even there to try.
    assert ct.run(["nsenter", "-t", str(pid), "-m", "ls", "-A", AGENT_DIR]).stdout == ""
    modes = ct.run(["sh", "-c", f"stat -c '%n %U:%G %a' {AGENT_DIR} {AGENT_DIR}/*"]).stdout
    for line in modes.splitlines():
        name, owner, mode = line.split()
        expected = {"certificate_public.pem": "644"}.get(Path(name).name,
                                                         "700" if name == AGENT_DIR else "600")
        assert (owner, mode) == ("root:root", expected), modes
    # What systemd handed over is private to the agent's uid (and root).
    assert ct.run(["stat", "-c", "%a", CREDS]).stdout.strip() in ("500", "550"), CREDS
    process = ct.run(["sh", "-c", f"tr '\\0' '\\n' < /proc/{pid}/environ; "
                      f"tr '\\0' ' ' < /proc/{pid}/cmdline"]).stdout
    assert "CREDENTIALS_DIRECTORY=" in process
    for secret in secrets:
        assert secret not in process


def assert_no_secret_anywhere(ct, secrets) -> None:
    """Not in the journal, not in any world-readable file under /etc, /var, /run, /tmp."""
    ct.run(["journalctl", "--sync"], check=False)
    journal = ct.run(["journalctl", "-b", "-o", "cat", "--no-pager"]).stdout
    readable = ct.run(["sh", "-c", "find /etc /var /run /tmp /root -xdev -type f -perm -o=r "
                       "-size -2M -print0 2>/dev/null | xargs -0 cat 2>/dev/null"],
                      check=False).stdout
    for secret in secrets:
        assert secret not in journal
        assert secret not in readable


def agent_dir_bytes(ct) -> str:
    """Everything under the agent directory, both generations included, as text."""
    return ct.run(["sh", "-c", f"find {AGENT_DIR} -type f -exec cat {{}} +"]).stdout


def test_agent_runs_unprivileged_and_never_sees_the_files(suite, base, boot, preseed, identity):
    ct = boot(base, prefix="unpriv")
    key = preseed.sas_key(21)
    result = ct.install_deb(preseed.for_connection_string(preseed.connection_string(key=key)))
    assert VERDICT in out_of(result), out_of(result)
    assert_unprivileged(ct, [key])
    assert exposure(ct)[0] <= 1.5
    # The certificate method: the key and certificate come through LoadCredential= as well.
    _, pem = put_identity(ct, identity)
    result = reconfigure(ct, preseed.for_certificate())
    assert VERDICT in out_of(result), out_of(result)
    assert_unprivileged(ct, [key, *key_body(pem)])
    assert_no_secret_anywhere(ct, [key, *key_body(pem)])
    if suite == "bullseye":
        before = agent_dir_bytes(ct)
        refused = ct.run(["defender-setup", "seal"], check=False)
        assert refused.returncode == 78
        assert refused.stderr.splitlines() == [
            "defender-setup: error: credential sealing: needs systemd 250 or later (systemd-creds, "
            "Debian 12 or later); this system has systemd 247: leave the credentials unsealed"]
        assert agent_dir_bytes(ct) == before


def needs_sealing(suite) -> None:
    if suite == "bullseye":  # the refusal itself is checked above
        pytest.skip("sealing needs systemd 250 (Debian 12 and later)")


def test_sealed_set_works_holds_no_key_and_does_not_travel(suite, base, boot, preseed,
                                                           identity):
    needs_sealing(suite)
    image = base
    ct = boot(image, prefix="sealed")
    key = preseed.sas_key(22)
    result = ct.install_deb(preseed.for_connection_string(preseed.connection_string(key=key))
                            + list(SEAL))
    assert VERDICT in out_of(result) and "sealed with the host key" in out_of(result)
    assert ct.run(["ls", "-A", AGENT_DIR]).stdout.split() == [".defender-setup",
                                                             "connection_string.txt.cred"]
    assert "secrets:         sealed (host key)" in ct.run(["defender-setup", "status"]).stdout
    assert re.search(r"\[ ok \] sealed-credentials.*\n +sealed \(host key\)",
                     ct.run(["defender-setup", "check", "--offline"]).stdout)
    # systemd decrypted it for the agent; the plain name was not loaded
    assert ct.read(f"{CREDS}/connection_string.txt") == "absent"
    assert_unprivileged(ct, [key])

    _, pem = put_identity(ct, identity)  # switch method: the private key is sealed
    result = reconfigure(ct, preseed.for_certificate())
    assert VERDICT in out_of(result), out_of(result)
    assert ct.exists(f"{AGENT_DIR}/certificate_private.pem.cred")
    assert not ct.exists(f"{AGENT_DIR}/certificate_private.pem")
    secrets = [key, *key_body(pem)]
    stored = agent_dir_bytes(ct)
    assert all(secret not in stored for secret in secrets)
    for command in (["rollback"], ["unseal"], ["seal"]):
        result = ct.run(["defender-setup", *command])
        assert VERDICT in result.stdout, out_of(result)
    assert ct.exists(f"{AGENT_DIR}/connection_string.txt.cred")  # the SAS set, sealed again
    assert all(secret not in agent_dir_bytes(ct) for secret in secrets)
    assert_no_secret_anywhere(ct, secrets)

    # The sealed set, copied to another machine (another host key), does not decrypt there.
    archive = ct.run(["sh", "-c", f"tar -C {AGENT_DIR} -cf - . | base64 -w0"]).stdout
    other = boot(image, prefix="sealed")
    other.install_deb()
    other.run(["sh", "-c", f"install -d -m 0700 {AGENT_DIR}; "
               f"base64 -d | tar -C {AGENT_DIR} -xpf -"], input=archive)
    check = other.run(["defender-setup", "check", "--offline"], check=False)
    assert check.returncode == 78, out_of(check)
    assert "[FAIL] sealed-credentials" in check.stdout
    assert "does not decrypt on this machine" in check.stdout
    restart = other.run(["defender-setup", "restart"], check=False)
    assert restart.returncode == 69 and "VERIFICATION FAILED" in restart.stdout
    assert "Decryption failed" in restart.stdout or "243/CREDENTIALS" in restart.stdout
    assert_no_secret_anywhere(other, secrets)

    ct.run(["apt-get", "purge", "-y", "defender-setup"],
           env={"DEBIAN_FRONTEND": "noninteractive"})
    assert not ct.exists(AGENT_DIR)


def test_image_sealed_at_first_boot_with_its_own_key_and_after_reboot(suite, deb, image_dir,
                                                                      boot, preseed):
    needs_sealing(suite)
    key = preseed.sas_key(23)
    built = harness.build_image(image_dir, deb, preseed=[
        *preseed.for_connection_string(preseed.connection_string(key=key)), *SEAL],
        suite=suite)
    assert "sealing deferred to the first boot" in out_of(built), out_of(built)
    agent = image_dir / AGENT_DIR.lstrip("/")
    assert (agent / "connection_string.txt").exists()  # plain until the first boot
    assert (agent / ".defender-setup/seal-pending").exists()
    assert not (image_dir / "var/lib/systemd/credential.secret").exists()  # no build host key

    ct = boot(image_dir, volatile=False)
    st = wait_active(ct)
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    sealer = ct.show("defender-setup-seal.service", "Result", "ExecMainStatus")
    assert (sealer["Result"], sealer["ExecMainStatus"]) == ("success", "0"), sealer
    assert ct.run(["ls", "-A", AGENT_DIR]).stdout.split() == [".defender-setup",
                                                             "connection_string.txt.cred"]
    assert ct.exists("/var/lib/systemd/credential.secret")
    assert key not in agent_dir_bytes(ct)
    assert "sealed (host key)" in ct.run(["defender-setup", "status"]).stdout
    ct.stop()

    ct = boot(image_dir, volatile=False)  # the reboot
    st = wait_active(ct)
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert ct.show("defender-setup-seal.service", "ConditionResult")["ConditionResult"] == "no"
    assert ct.read(f"{CREDS}/connection_string.txt") == "absent"  # loaded sealed
    assert ct.run(["defender-setup", "check", "--offline"]).returncode == 0
    assert_no_secret_anywhere(ct, [key])
