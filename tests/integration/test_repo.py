"""The signed apt repository (tools/make-repo) as a fleet uses it: install, upgrade, refuse.

A device is pointed at the repository exactly as the README says (its deb822 ``.sources``
block and ``Signed-By:`` key), installs the package from it with preseeded answers, and gets
a newer revision published later through ``apt upgrade`` and through Debian's
unattended-upgrades. The agent is connected to the local test hub throughout, so "the
identity is kept" means the hub accepts the same device again after exactly one restart.
An upgrade while the agent fails (a key the hub refuses) still completes the dpkg run, and
``apt remove`` then ``apt install`` keeps the identity. A repository without a signature,
signed by a key the device does not trust, or changed after signing is refused by apt.
"""

from __future__ import annotations

import harness
import pytest
import test_hub
from aptrepo import apt_update, installed_version, use_repository
from conftest import AGENT_DIR, ALL_SUITES, UNIT
from test_hub import connection_string, point_at_hub, status
from test_package import VERDICT, agent_files, journal_cursor, starts_since, state

# test_hub's fixtures: the local test hub (SAS, good-dev accepted) and its PKI.
pki, hub = test_hub.pki, test_hub.hub

UU_PACKAGES = ("unattended-upgrades",)
# What a device's administrator adds to allow the repository's updates (README).
UU_ORIGIN = ('Unattended-Upgrade::Origins-Pattern:: '
             '"origin=defender-setup,codename=${distro_codename}";\n')
# Debian's own switch for the daily timers (what dpkg-reconfigure unattended-upgrades writes);
# RandomSleep 0: the test starts the timers' services itself and must not wait up to 30 min.
UU_PERIODIC = ('APT::Periodic::Update-Package-Lists "1";\n'
               'APT::Periodic::Unattended-Upgrade "1";\n'
               'APT::Periodic::RandomSleep "0";\n')


# apt's words for each refusal, the same from Debian 11's gpgv to Debian 13's sqv.
REFUSAL = {"unsigned": "is not signed", "signed by another key": "is not signed",
           "altered after signing": "Hash Sum mismatch"}


def apt(ct, *args, check=True):
    return ct.run(["apt-get", "-y", *args], env={"DEBIAN_FRONTEND": "noninteractive"},
                  check=check, timeout=300)


def install_from(ct, repo, suite, pki, hub, preseed, key: int = 1) -> str:
    """Install from the repository, preseeded as good-dev with key ``key`` (the hub takes 1)."""
    use_repository(ct, repo, suite)
    apt_update(ct)
    point_at_hub(ct, pki, hub)
    ct.preseed(preseed.for_connection_string(
        connection_string(preseed, "good-dev", preseed.sas_key(key))))
    result = apt(ct, "install", "--no-install-recommends", "defender-setup")
    out = result.stdout + result.stderr
    assert preseed.sas_key(key) not in out
    return out


def install_connected(ct, repo, suite, pki, hub, preseed) -> None:
    out = install_from(ct, repo, suite, pki, hub, preseed)
    assert VERDICT in out and "connected to" in out, out


class Upgrade:
    """Before/after of an upgrade (or reinstall): one start, same files, connected again."""

    def __init__(self, ct, hub):
        self.ct, self.hub = ct, hub
        self.files = {k: v for k, v in agent_files(ct).items() if not k.startswith(".")}
        self.before = state(ct)
        self.cursor = journal_cursor(ct)
        self.accepted = len(hub.accepted())

    def check(self, version: str) -> None:
        ct = self.ct
        assert installed_version(ct) == version
        after = state(ct)
        assert after["ActiveState"] == "active", after
        assert starts_since(ct, self.cursor) == [after["InvocationID"]] != \
            [self.before["InvocationID"]], "not exactly one restart"
        assert after["NRestarts"] in (self.before["NRestarts"], "0")
        current = {k: v for k, v in agent_files(ct).items() if not k.startswith(".")}
        assert current == self.files, "the credentials changed"
        assert self.hub.wait_for(lambda: len(self.hub.accepted()) > self.accepted, 15)
        assert self.hub.accepted()[-1].client_id == "good-dev/DefenderIotMicroAgent"
        assert status(ct)["StatusText"].startswith("connected to"), status(ct)


def test_install_from_repository_apt_upgrade_then_remove_and_install_keep_the_identity(
        suite, base, boot, apt_repo, deb, deb_next, pki, hub, preseed):
    repo = apt_repo()
    repo.publish(deb)
    ct = boot(base)
    install_connected(ct, repo, suite, pki, hub, preseed)
    assert installed_version(ct).endswith("-1")

    repo.publish(deb_next)
    upgrade = Upgrade(ct, hub)
    apt_update(ct)
    result = apt(ct, "upgrade")
    assert VERDICT in result.stdout + result.stderr
    upgrade.check(installed_version(ct))
    assert installed_version(ct).endswith("-2")

    # apt remove keeps the credentials; installing again, with no answers, uses them.
    apt(ct, "remove", "defender-setup")
    assert ct.show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed")
    reinstall = Upgrade(ct, hub)
    result = apt(ct, "install", "--no-install-recommends", "defender-setup")
    assert VERDICT in result.stdout + result.stderr
    reinstall.check(installed_version(ct))


def test_unattended_upgrades_installs_the_new_revision_once_allowed(
        suite, boot, apt_repo, deb, deb_next, pki, hub, preseed):
    repo = apt_repo()
    repo.publish(deb)
    ct = boot(harness.base_image(extra=UU_PACKAGES, suite=suite))
    install_connected(ct, repo, suite, pki, hub, preseed)
    ct.copy_in(UU_PERIODIC, "/etc/apt/apt.conf.d/20auto-upgrades", mode=0o644)
    repo.publish(deb_next)

    # Debian's default configuration allows Debian's origins only: the new revision waits.
    apt_update(ct)
    ct.run(["unattended-upgrade"], timeout=300)
    assert installed_version(ct).endswith("-1")

    # Allowed by configuration, it arrives through the daily timers' own services.
    ct.copy_in(UU_ORIGIN, "/etc/apt/apt.conf.d/51defender-setup", mode=0o644)
    upgrade = Upgrade(ct, hub)
    ct.run(["systemctl", "start", "apt-daily.service"], timeout=300)
    ct.run(["systemctl", "start", "apt-daily-upgrade.service"], timeout=300)
    log = ct.read("/var/log/unattended-upgrades/unattended-upgrades.log")
    assert "defender-setup" in log, log
    upgrade.check(installed_version(ct))
    assert installed_version(ct).endswith("-2"), log
    dpkg_log = ct.read("/var/log/unattended-upgrades/unattended-upgrades-dpkg.log")
    assert VERDICT in dpkg_log, dpkg_log


def test_upgrade_with_the_agent_failing_does_not_fail_the_dpkg_run(
        suite, base, boot, apt_repo, deb, deb_next, pki, hub, preseed):
    repo = apt_repo()
    repo.publish(deb)
    ct = boot(base)
    # A key the hub refuses (revoked after it was written, say): the agent exits 76 and is not
    # restarted. The pre-flight probe would refuse it before writing: it is turned off here.
    ct.preseed([preseed.line("probe-hub", "boolean", "false")])
    out = install_from(ct, repo, suite, pki, hub, preseed, key=7)
    assert "VERIFICATION FAILED" in out and "unconfigured, as before" in out, out
    # The refused set is kept as the previous one; put it back as a set gone bad in place.
    ct.run(["defender-setup", "rollback", "--no-restart"])
    assert ct.exists("/var/defender_iot_micro_agent/connection_string.txt")

    repo.publish(deb_next)
    apt_update(ct)
    result = apt(ct, "upgrade", check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "VERIFICATION FAILED" in out and "dpkg-reconfigure defender-setup" in out, out
    assert installed_version(ct).endswith("-2")
    assert ct.run(["dpkg-query", "-W", "-f=${Status}", "defender-setup"]
                  ).stdout == "install ok installed"
    assert ct.run(["dpkg", "--audit"]).stdout == ""
    assert preseed.sas_key(7) not in out


@pytest.mark.parametrize("suite", ALL_SUITES)  # cheap: no install
def test_unsigned_wrongly_signed_or_altered_repository_is_refused(suite, boot, apt_repo, deb):
    ct = boot(harness.base_image(suite=suite))
    good = apt_repo()
    good.publish(deb)
    cases = {}  # the order of REFUSAL
    unsigned = cases["unsigned"] = apt_repo()
    unsigned.publish(deb)
    unsigned.strip_signatures(suite)
    cases["signed by another key"] = apt_repo(key="other")
    cases["signed by another key"].publish(deb)
    altered = cases["altered after signing"] = apt_repo()
    altered.publish(deb)
    packages = altered.root / "dists" / suite / "main" / "binary-amd64" / "Packages"
    packages.write_text(packages.read_text().replace("Priority: optional", "Priority: required"))
    (packages.parent / "Packages.gz").unlink()

    for case, repo in cases.items():
        use_repository(ct, repo, suite, keyring=good.keyring)
        result = apt_update(ct, check=False)
        out = result.stdout + result.stderr
        assert result.returncode == 100 and REFUSAL[case] in out, f"{case}: {out}"
        policy = ct.run(["apt-cache", "policy", "defender-setup"]).stdout
        assert "Candidate: (none)" in policy or policy.strip() == "", f"{case}: {policy}"
        install = apt(ct, "install", "defender-setup", check=False)
        assert install.returncode != 0, f"{case}: {install.stdout}"
        assert installed_version(ct) == ""
        ct.run(["sh", "-c", "rm -rf /var/lib/apt/lists/*"])

    # The same device with the right repository: it was the signature, not the setup.
    use_repository(ct, good, suite)
    apt_update(ct)
    apt(ct, "install", "--no-install-recommends", "defender-setup")
    assert installed_version(ct).endswith("-1")
    assert state(ct)["UnitFileState"] == "enabled"
    assert not ct.exists(f"{AGENT_DIR}/connection_string.txt")
    assert ct.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
