"""A signed apt repository made by tools/make-repo, served over HTTP to booted containers.

Interface (the ``apt_repo`` fixture in ``conftest.py`` wraps these)::

    server = Server(directory).start()      # http://127.0.0.1:PORT/ serving ``directory``
    repo = Repository(directory / "name", gnupghome, base_url=server.url + "/name")
    repo.publish(deb, ...)                  # tools/make-repo: include, sign, export the key
                                            # (each defender-setup .deb with its agent's)
    repo.strip_signatures(suite)            # make it an unsigned repository
    repo.keyring                            # the exported public key (binary, for Signed-By)
    use_repository(ct, repo, suite)         # the README's .sources file and key on a device
    server.stop()

The containers share the host's network, so the device reaches the server at 127.0.0.1, as
it reaches the test hub. The signing keys are generated at test time in a private temporary
GnuPG home: nothing secret is committed or leaves the test's directory.
"""

from __future__ import annotations

import functools
import re
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import harness

KEYRING_NAME = "defender-setup-archive-keyring.gpg"
DEVICE_KEYRING = "/etc/apt/keyrings/defender-setup.gpg"
DEVICE_SOURCES = "/etc/apt/sources.list.d/defender-setup.sources"
# Debian's own sources, per release (the deb822 file is trixie's): the images already hold
# every dependency, so the device sees only the repository under test.
DEBIAN_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d/debian.sources")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # apt's requests are not the test's output
        pass


class Server:
    """A threaded HTTP server on 127.0.0.1 (an ephemeral port) serving ``directory``."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Repository:
    """One repository directory, built and updated with tools/make-repo."""

    def __init__(self, root: Path, gnupghome: Path, base_url: str):
        self.root = Path(root)
        self.gnupghome = Path(gnupghome)
        self.url = base_url

    def publish(self, *debs: Path) -> None:
        result = subprocess.run([str(harness.REPO / "tools" / "make-repo"), "--out",
                                 str(self.root), "--gnupghome", str(self.gnupghome),
                                 *(str(d) for deb in debs for d in harness.debs(deb))],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"make-repo failed:\n{result.stderr[-3000:]}"

    @property
    def keyring(self) -> Path:
        return self.root / KEYRING_NAME

    def strip_signatures(self, suite: str) -> None:
        for name in ("InRelease", "Release.gpg"):
            (self.root / "dists" / suite / name).unlink()


def readme_sources() -> str:
    """The README's ``defender-setup.sources`` example: what the test writes is what it says."""
    text = (harness.REPO / "README.md").read_text()
    match = re.search(r"\n((?:    [A-Za-z-]+: .*\n)*    Types: deb\n(?:    [A-Za-z-]+: .*\n)+)",
                      text)
    assert match, "README.md has no indented deb822 block starting with 'Types: deb'"
    return "".join(line[4:] + "\n" for line in match.group(1).splitlines())


def sources_for(url: str, suite: str) -> str:
    text = readme_sources()
    text, urls = re.subn(r"(?m)^URIs: .*$", f"URIs: {url}", text)
    text, suites = re.subn(r"(?m)^Suites: .*$", f"Suites: {suite}", text)
    assert urls == suites == 1 and f"Signed-By: {DEVICE_KEYRING}" in text, text
    return text


def use_repository(ct, repo: Repository, suite: str, keyring: Path | None = None) -> None:
    """Point a device at ``repo`` as the README says (``keyring``: trust another key)."""
    ct.run(["rm", "-f", *DEBIAN_SOURCES])
    ct.run(["install", "-d", "-m", "0755", "/etc/apt/keyrings"])
    ct.copy_in(Path(keyring or repo.keyring), DEVICE_KEYRING, mode=0o644)
    ct.copy_in(sources_for(repo.url, suite), DEVICE_SOURCES, mode=0o644)


def apt_update(ct, check: bool = True) -> subprocess.CompletedProcess:
    return ct.run(["apt-get", "update"], check=check, timeout=120)


def installed_version(ct) -> str:
    return ct.run(["dpkg-query", "-W", "-f=${Version}", "defender-setup"], check=False).stdout
