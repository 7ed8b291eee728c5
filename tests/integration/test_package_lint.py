"""Static checks of the built package: lintian --pedantic, shellcheck, and piuparts.

piuparts installs the .deb with no answers into a minimal chroot (policy-rc.d 101, no
systemd), removes and purges it, and fails on anything left behind.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import harness
import pytest

REPO = harness.REPO
SCRIPTS = ["debian/defender-setup.config", "debian/defender-setup.postinst",
           "debian/defender-setup.prerm", "debian/defender-setup.postrm"]


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


def test_lintian_overrides_say_why():
    text = (REPO / "debian" / "defender-setup.lintian-overrides").read_text()
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
def test_piuparts(deb, tmp_path):
    base = piuparts_base()
    result = subprocess.run(["piuparts", "-b", str(base), "-d", harness.SUITE, str(deb)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "PASS: All tests." in result.stdout + result.stderr


def piuparts_base() -> Path:
    """``mmdebstrap --variant=minbase --include=eatmydata`` tarball, cached (RECIPES.md)."""
    path = harness.CACHE / f"piuparts-base-{harness.SUITE}.tar.gz"
    with harness._lock(path.name):
        if not path.exists():
            tmp = path.with_suffix(".tmp.tar.gz")
            subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=eatmydata",
                            harness.SUITE, str(tmp)], check=True, timeout=1200)
            tmp.rename(path)
    return path
