"""Static checks of the built package: lintian --pedantic, shellcheck, and piuparts.

piuparts installs the .deb with no answers into a minimal chroot (policy-rc.d 101, no
systemd), removes and purges it, upgrades to it from the previous release, and fails on
anything left behind.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import harness
import pytest

REPO = harness.REPO
SCRIPTS = ["debian/defender-setup.config", "debian/defender-setup.postinst",
           "debian/defender-setup-agent.prerm", "debian/defender-setup.postrm",
           "debian/defender-setup-agent.postinst", "debian/defender-setup-agent.postrm",
           "debian/generator/defender-setup-generator"]


def needs(tool):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


@needs("lintian")
def test_lintian_pedantic_has_no_errors_or_warnings(deb):
    changes = sorted(deb.parent.glob("*_amd64.changes")) or sorted(deb.parent.glob("*.changes"))
    target = changes[0] if changes else deb  # .changes: source tags (po-debconf) too
    out = subprocess.run(["lintian", "-I", "--pedantic", str(target)], capture_output=True,
                         text=True).stdout
    bad = [line for line in out.splitlines() if line.startswith(("E:", "W:"))]
    assert not bad, out
    # Info only, but real: lintian finds the questions the config script asks by their names
    # at the start of a "db_input PRIORITY NAME" line; a question it cannot see is unchecked.
    assert "unused-debconf-template" not in out, out


@pytest.mark.parametrize("package", ["defender-setup", "defender-setup-agent"])
def test_lintian_overrides_say_why(package):
    text = (REPO / "debian" / f"{package}.lintian-overrides").read_text()
    previous = ""
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert previous.startswith("#"), f"override without a comment: {line}"
        previous = line


@needs("shellcheck")
def test_shellcheck_maintainer_scripts():
    result = subprocess.run(["shellcheck", "-s", "sh", *SCRIPTS], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@needs("piuparts")
def test_piuparts_install_purge_and_upgrade_from_the_previous_release(
        suite, deb, previous_release, apt_repo, public_dir):
    """The previous release (the single defender-setup package, before the split) is in a
    signed repository; this build's two packages are tested.

    piuparts installs and purges both, then installs the previous release from the
    repository, upgrades it to both (files move to defender-setup-agent) and purges them,
    failing on anything left behind each time.
    """
    repo = apt_repo(directory=public_dir)
    repo.publish(previous_release)
    line = f"deb [signed-by={repo.keyring}] file://{repo.root} {suite} main"
    result = subprocess.run(
        ["piuparts", "-b", str(piuparts_base(suite)), "-d", suite,
         f"--bindmount={repo.root}", f"--extra-repo={line}",
         # Debian 13's debconf keeps dpkg-preconfigure's temporary directory after purge.
         "-i", "/var/cache/debconf/tmp.ci/", *map(str, harness.debs(deb))],
        capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "PASS: Installation and purging test." in out, out[-3000:]
    assert "PASS: Installation, upgrade and purging tests." in out, out[-3000:]
    assert "PASS: All tests." in out


@pytest.fixture
def public_dir():
    """A directory apt's unprivileged _apt user can read (the repository and its key)."""
    path = Path(tempfile.mkdtemp(prefix="deb-repo-", dir=harness.CACHE))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The package's dependencies are in piuparts' base chroot: without them each of its two runs
# downloads and installs python3 and friends (over a minute here), which tests Debian, not us.
PIUPARTS_BASE_PACKAGES = ("eatmydata", "debconf", "python3", "python3-cryptography",
                          "python3-systemd", "python3-debconf", "python3-paho-mqtt")


def piuparts_base(suite: str = harness.SUITE) -> Path:
    """``mmdebstrap --variant=minbase`` tarball with the dependencies, cached."""
    path = harness.CACHE / f"piuparts-base-deps-{suite}.tar.gz"
    with harness._lock(path.name):
        if not path.exists():
            tmp = path.with_suffix(".tmp.tar.gz")
            subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                            "--include=" + ",".join(PIUPARTS_BASE_PACKAGES), suite, str(tmp)],
                           check=True, timeout=1200)
            tmp.rename(path)
    return path


@needs("debconf-updatepo")
def test_translations_are_current_and_complete(tmp_path):
    """templates.pot matches the templates, every .po is valid, nothing fuzzy or untranslated.

    After changing debian/defender-setup.templates: ``cd debian && debconf-updatepo``, then
    translate what became fuzzy (podebconf-report-po can ask the Debian translators).
    """
    work = tmp_path / "debian"
    shutil.copytree(REPO / "debian", work)
    subprocess.run(["debconf-updatepo"], cwd=work, check=True, capture_output=True)

    def body(path: Path) -> str:
        return "".join(line for line in path.read_text().splitlines(True)
                       if not line.startswith('"POT-Creation-Date:'))

    assert body(work / "po" / "templates.pot") == body(REPO / "debian" / "po" / "templates.pot"), \
        "debian/po/templates.pot is out of date: run debconf-updatepo in debian/"
    languages = {po.stem for po in (work / "po").glob("*.po")}
    assert {"de", "fr", "es", "pt_BR"} <= languages, languages
    for po in sorted((work / "po").glob("*.po")):
        result = subprocess.run(["msgfmt", "-c", "--statistics", "-o", "/dev/null", str(po)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "fuzzy" not in result.stderr and "untranslated" not in result.stderr, \
            f"{po.name}: {result.stderr.strip()}"
