"""Fixtures for tests with real parts: the built .deb, mmdebstrap images, booted systemd.

    deb        (session) Path of defender-setup's .deb under test (tools/build-deb once, or
               $DEFENDER_SETUP_DEB); defender-setup-agent's lies beside it
    previous_release (session) defender-setup's .deb of the previous release: the tree
               before the last ``__version__`` change (the single package before the split),
               built with its own tools/build-deb ($DEFENDER_SETUP_PREVIOUS_REF: another ref)
    deb_dir    (session) a host directory holding only that build's two .debs (bound at
               /srv/deb): defender-setup and defender-setup-agent (harness.debs)
    deb_next   (session) the same package built as Debian revision -2 (upgrade tests)
    suite      (session) the Debian release of the booted tests, one of ``SUITES``
    base       (session) the cached base rootfs of that release (harness.base_image())
    booted     a started Container of ``base`` (volatile overlay) with the .deb at /srv/deb,
               not yet installed: ``booted.install_deb(preseed=[...])``
    boot       a factory: ``boot(rootfs, volatile=True)`` -> started Container, stopped at
               the end of the test (for images from harness.build_image)
    image_dir  a fresh path under the cache for harness.build_image, removed afterwards
    identity   factory: ``identity(cn="dev1", days=365, key="rsa2048")`` -> (cert_pem, key_pem)
    preseed    helpers building debconf-set-selections lines (see ``Preseed``)
    apt_repo   factory: ``apt_repo(key="main", directory=None)`` -> an empty
               aptrepo.Repository served over HTTP (``.publish(deb)``) unless ``directory``
               is given; repositories of one key name share one signing key

Integration tests need root, systemd-nspawn and mmdebstrap; without them they are skipped.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aptrepo  # noqa: E402
import harness  # noqa: E402

UNIT = "defender-iot-micro-agent.service"
ALL_SUITES = ("bullseye", "bookworm", "trixie")
# The releases the booted tests run on: bookworm (make test), or all three (make test-full
# sets DEFENDER_SETUP_SUITES="bullseye bookworm trixie"). Tests that use ``base``, ``booted``
# or ``suite`` follow it.
SUITES = tuple(os.environ.get("DEFENDER_SETUP_SUITES", harness.SUITE).split())
AGENT_DIR = "/var/defender_iot_micro_agent"


def pytest_collection_modifyitems(config, items):
    missing = [tool for tool in ("systemd-nspawn", "mmdebstrap", "nsenter")
               if shutil.which(tool) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "integration tests need root"
    elif missing:
        reason = f"integration tests need {', '.join(missing)} (tools/install-deps)"
    for item in items:
        item.add_marker(pytest.mark.integration)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def deb() -> Path:
    return harness.build_deb()


@pytest.fixture(scope="session")
def deb_dir(deb, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("deb")
    for package in harness.debs(deb):  # defender-setup and defender-setup-agent
        shutil.copy2(package, directory / package.name)
    return directory


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory) -> Path:
    ref = os.environ.get("DEFENDER_SETUP_PREVIOUS_REF") or harness.previous_version_ref()
    return harness.build_release(ref, tmp_path_factory.mktemp("previous") / "dist")


@pytest.fixture(scope="session")
def deb_next(deb, tmp_path_factory) -> Path:
    """The same package as a newer Debian revision (-2), alone in its directory."""
    return harness.build_deb(revision=2, dist_dir=tmp_path_factory.mktemp("next") / "dist")


@pytest.fixture(scope="session", params=SUITES)
def suite(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def base(suite) -> Path:
    return harness.base_image(suite=suite)


@pytest.fixture
def boot(deb_dir):
    started = []

    def start(rootfs: Path, volatile: bool = True, **kw) -> harness.Container:
        binds = {str(deb_dir): harness.GUEST_DEB_DIR, **kw.pop("binds", {})}
        container = harness.Container(rootfs, volatile=volatile, binds=binds, **kw)
        started.append(container)
        return container.start()

    yield start
    for container in started:
        container.stop()


@pytest.fixture
def image_dir():
    harness.CACHE.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="deb-image-", dir=harness.CACHE))
    yield path / "rootfs"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def booted(boot, base) -> harness.Container:
    return boot(base)


@pytest.fixture(scope="session")
def repo_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    server = aptrepo.Server(root).start()
    yield server, root
    server.stop()


@pytest.fixture
def apt_repo(repo_server, tmp_path_factory):
    server, root = repo_server

    def make(key: str = "main", directory: Path | None = None) -> aptrepo.Repository:
        directory = directory or Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
        return aptrepo.Repository(directory, tmp_path_factory.getbasetemp() / f"gnupg-{key}",
                                  f"{server.url}/{directory.name}")

    return make


@pytest.fixture
def identity():
    from certfactory import make_identity

    def make(cn: str = "dev1", **kw) -> tuple[bytes, bytes]:
        ident = make_identity(cn=cn, **kw)
        return ident.cert_pem, ident.key_pem

    return make


class Preseed:
    """debconf-set-selections lines for the package's questions (the names of docs/design.md)."""

    HUB = "test-hub.azure-devices.net"

    @staticmethod
    def sas_key(seed: int = 1) -> str:
        return base64.b64encode(bytes((seed + i) % 256 for i in range(32))).decode()

    @classmethod
    def connection_string(cls, device="dev1", module="DefenderIotMicroAgent", key=None) -> str:
        key = key or cls.sas_key()
        return (f"HostName={cls.HUB};DeviceId={device};ModuleId={module};"
                f"SharedAccessKey={key}")

    @staticmethod
    def line(question: str, kind: str, value: str) -> str:
        return f"defender-setup defender-setup/{question} {kind} {value}"

    @classmethod
    def for_connection_string(cls, text: str | None = None, strict: bool = False) -> list[str]:
        return [cls.line("auth-method", "select", "connection-string"),
                cls.line("connection-string", "password", text or cls.connection_string()),
                cls.line("strict-verify", "boolean", "true" if strict else "false")]

    @classmethod
    def for_certificate(cls, cert_path="/root/device.pem", key_path="/root/device.key",
                        device="dev1", module="DefenderIotMicroAgent",
                        strict: bool = False) -> list[str]:
        return [cls.line("auth-method", "select", "certificate"),
                cls.line("hub-hostname", "string", cls.HUB),
                cls.line("device-id", "string", device),
                cls.line("module-id", "string", module),
                cls.line("certificate-file", "string", cert_path),
                cls.line("private-key-file", "string", key_path),
                cls.line("strict-verify", "boolean", "true" if strict else "false")]


@pytest.fixture
def preseed() -> type[Preseed]:
    return Preseed
