"""The same .deb on the other target releases: Debian 11 (bullseye) and 13 (trixie).

One booted install with preseeded answers, one reconfigure to the certificate method with
exactly one restart, then purge: the package's promises do not depend on bookworm's versions
of debconf, dpkg, systemd or python3.
"""

from __future__ import annotations

import harness
import pytest
from conftest import AGENT_DIR, SUITES
from test_package import VERDICT, journal_cursor, put_identity, reconfigure, starts_since, state


# The full matrix (make test-full) runs every booted test there already.
@pytest.mark.parametrize("suite", [s for s in ("bullseye", "trixie") if s not in SUITES])
def test_install_reconfigure_purge(suite, boot, preseed, identity):
    ct = boot(harness.base_image(suite=suite))
    result = ct.install_deb(preseed.for_connection_string())
    assert VERDICT in result.stdout + result.stderr, result.stdout + result.stderr
    before = state(ct)
    assert before["ActiveState"] == "active"

    put_identity(ct, identity)
    cursor = journal_cursor(ct)
    result = reconfigure(ct, preseed.for_certificate())
    after = state(ct)
    assert VERDICT in result.stdout + result.stderr
    assert starts_since(ct, cursor) == [after["InvocationID"]] != [before["InvocationID"]]
    assert ct.exists(f"{AGENT_DIR}/certificate_private.pem")

    ct.run(["apt-get", "purge", "-y", "defender-setup"],
           env={"DEBIAN_FRONTEND": "noninteractive"})
    assert not ct.exists(AGENT_DIR)
    assert state(ct)["ActiveState"] == "inactive"
    assert "defender-setup" not in ct.sh("cat /var/cache/debconf/*.dat").stdout
