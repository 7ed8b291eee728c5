"""Image builds with preseeded answers (docs/testing.md), then the image's first boot.

mmdebstrap installs the .deb in a chroot: no systemd runs and a policy-rc.d forbids starting
services, so the package writes the credentials, enables the unit and skips the restart. The
first boot must then start the agent with them.
"""

from __future__ import annotations

import time

import harness
from conftest import AGENT_DIR, UNIT


def wait_active(ct, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = ct.show(UNIT, "ActiveState", "SubState", "InvocationID", "NRestarts")
        if st["ActiveState"] == "active" or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def assert_first_boot_healthy(ct) -> None:
    st = wait_active(ct)
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    time.sleep(2)  # stable: the same invocation, no automatic restart
    again = ct.show(UNIT, "ActiveState", "InvocationID", "NRestarts")
    assert (again["InvocationID"], again["NRestarts"]) == (st["InvocationID"], "0"), again
    status = ct.run(["defender-setup", "status"]).stdout
    assert "dev1" in status


def test_image_with_connection_string(deb, image_dir, boot, preseed, suite):
    key = preseed.sas_key(11)
    result = harness.build_image(image_dir, deb,
                                 preseed=preseed.for_connection_string(
                                     preseed.connection_string(key=key)), suite=suite)
    assert "restart skipped" in result.stdout + result.stderr
    assert key not in result.stdout + result.stderr
    assert (image_dir / AGENT_DIR.lstrip("/") / "connection_string.txt").exists()
    assert key not in (image_dir / "var/cache/debconf/passwords.dat").read_text()
    assert_first_boot_healthy(boot(image_dir))


def test_image_with_certificate(deb, image_dir, boot, preseed, identity, suite):
    cert, key = identity(cn="dev1")
    result = harness.build_image(image_dir, deb, preseed=preseed.for_certificate(),
                                 files={"/root/device.pem": cert, "/root/device.key": key},
                                 suite=suite)
    assert "restart skipped" in result.stdout + result.stderr
    agent = image_dir / AGENT_DIR.lstrip("/")
    assert (agent / "certificate_private.pem").read_bytes().strip() == key.strip()
    assert (agent / "certificate_private.pem").stat().st_mode & 0o777 == 0o600
    ct = boot(image_dir)
    assert_first_boot_healthy(ct)
    assert "certificate" in ct.run(["defender-setup", "status"]).stdout
