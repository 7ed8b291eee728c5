"""The source package's autopkgtest (debian/tests), run as Debian's CI would, on booted systemd.

qemu has no KVM here and ``-- chroot``/``-- unshare`` skip tests that need systemd, so
autopkgtest runs inside a booted container with the ``null`` virtualisation server: the
container is the testbed. The source package is the one tools/build-deb made (its .dsc,
unpacked on the host), the binary the .deb under test.
"""

from __future__ import annotations

import re
import subprocess

import harness
from aptrepo import DEBIAN_SOURCES

TESTS = ("unconfigured-install", "hub-lifecycle")


def test_autopkgtest_null_in_a_booted_container(suite, deb, boot, tmp_path):
    dsc = next(deb.parent.glob("defender-setup_*.dsc"))
    source = tmp_path / "source"
    subprocess.run(["dpkg-source", "--no-check", "-x", str(dsc), str(source)], check=True,
                   capture_output=True, timeout=120)
    # autopkgtest takes a tree with debian/files for a built one: nothing to build, so the
    # testbed needs no dpkg-dev (an unbuilt tree or the .dsc would install it).
    (source / "debian" / "files").touch()
    ct = boot(harness.base_image(extra=("autopkgtest",), suite=suite),
              binds={str(tmp_path): "/srv/autopkgtest"})
    # Every dependency is in the image: the testbed needs no mirror.
    ct.run(["rm", "-f", *DEBIAN_SOURCES])
    # null claims isolation-machine up to Debian 12's autopkgtest and no isolation from
    # Debian 13's on; this testbed is a booted container, what isolation-container asks for.
    result = ct.run(["autopkgtest", "--ignore-restrictions=isolation-container",
                     *ct.guest_debs(), "/srv/autopkgtest/source/", "--", "null"],
                    check=False, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    for test in TESTS:
        assert re.search(rf"^{test}\s+PASS", out, re.M), out[-6000:]
