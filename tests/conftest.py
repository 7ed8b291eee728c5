"""Shared test setup.

Like cloud-init's tests, unit and functional tests may not start processes by accident: an
autouse fixture makes every process start fail unless the test names the program it runs::

    @pytest.mark.allow_subprocess("systemctl", "python3")
    @pytest.mark.allow_subprocess("fork")      # os.fork() itself

The refusal is a :class:`SubprocessForbidden`, a ``BaseException``: code under test that
catches ``Exception`` (to turn an ``OSError`` into a one-line message, say) cannot swallow it.
Unit tests may name none: a test that starts a program belongs in tests/functional.
Integration tests, which exist to run real things, are exempt as a whole.

The fixtures shared by the unit and functional tiers live here too: credential inputs made at
test time (``sas_inputs``, ``cert_inputs``), throw-away roots (``root``, ``booted_root``), the
test hub's PKI (``hub_pki``, one per session) and its SAS broker (``sas_broker``).
"""

from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass

import pytest

from tests import certfactory


class SubprocessForbidden(BaseException):
    """A test started a program it did not name in ``allow_subprocess``."""


def pytest_configure(config):
    config.addinivalue_line("markers", "hub: the agent's own tests (its runtime and hub code), "
                            "also run under Debian 11's and 13's Python and paho-mqtt")
    config.addinivalue_line("markers", "allow_subprocess(*programs): the test may start these "
                            "programs (by base name; 'fork' for os.fork)")


def _program(args, executable) -> str:
    first = executable or (args if isinstance(args, (str, bytes, os.PathLike)) else args[0])
    return os.path.basename(os.fsdecode(first))


@pytest.fixture(autouse=True)
def _no_subprocess(request, monkeypatch):
    if "integration" in request.node.nodeid.split("/"):
        return
    allowed = set()
    for marker in request.node.iter_markers("allow_subprocess"):
        if "unit" in request.node.nodeid.split("/"):
            raise pytest.UsageError(f"{request.node.nodeid}: unit tests start no program; "
                                    "a test that does belongs in tests/functional")
        if not marker.args:
            raise pytest.UsageError(f"{request.node.nodeid}: allow_subprocess needs the "
                                    "programs it allows, e.g. allow_subprocess('systemctl')")
        allowed.update(marker.args)
    execute_child, fork = subprocess.Popen._execute_child, os.fork

    def refuse(program):
        raise SubprocessForbidden(f"the test started {program!r}; name it: "
                                  f"@pytest.mark.allow_subprocess({program!r})")

    def guarded_child(self, args, executable, *rest, **kwargs):
        program = _program(args, executable)
        if program not in allowed:
            refuse(program)
        return execute_child(self, args, executable, *rest, **kwargs)

    def guarded_fork():
        if "fork" not in allowed:
            refuse("fork")
        return fork()

    monkeypatch.setattr(subprocess.Popen, "_execute_child", guarded_child)
    monkeypatch.setattr(os, "fork", guarded_fork)


HUB, DEVICE, MODULE = "hub1.azure-devices.net", "dev1", "DefenderIotMicroAgent"


@dataclass
class Inputs:
    """Raw inputs for one method: what a person would give the CLI."""

    method: str
    connection_string: bytes
    certificate: bytes | None = None
    private_key: bytes | None = None

    def validated(self):
        from defender_setup.credentials import validate

        return validate(self.method, self.connection_string, self.certificate, self.private_key)


def snapshot(root):
    """Every path under root with its mode and content: 'nothing changed' made checkable."""
    seen = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            st = os.lstat(path)
            data = open(path, "rb").read() if os.path.isfile(path) else None
            seen[os.path.relpath(path, root)] = (st.st_mode, data)
    return seen


def sas_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def sas_inputs() -> Inputs:
    text = f"HostName={HUB};DeviceId={DEVICE};ModuleId={MODULE};SharedAccessKey={sas_key()}"
    return Inputs("connection-string", text.encode())


@pytest.fixture
def cert_inputs() -> Inputs:
    ident = certfactory.make_identity(cn=DEVICE, key="p256")
    text = f"HostName={HUB};DeviceId={DEVICE};ModuleId={MODULE};x509=true"
    return Inputs("certificate", text.encode(), ident.cert_pem, ident.key_pem)


@pytest.fixture
def root(tmp_path):
    """A throw-away root directory standing in for / (not created: writers create it)."""
    return tmp_path / "root"


@pytest.fixture
def booted_root(tmp_path):
    """A throw-away root that looks booted with systemd (``run/systemd/system`` exists), so
    the service wrapper asks (the fake) systemctl instead of skipping the restart."""
    path = tmp_path / "root"
    (path / "run/systemd/system").mkdir(parents=True)
    return path


@pytest.fixture(scope="session")
def hub_pki(tmp_path_factory):
    """The test hub's CA and server certificate (tests/hubsim/pki.py), one for the session:
    tests that need an unrelated CA or an expired server certificate make their own."""
    from tests.hubsim.pki import Pki

    return Pki(tmp_path_factory.mktemp("hub-pki"))


@pytest.fixture
def sas_broker(hub_pki):
    """The SAS-verifying test hub on loopback (tests/hubroot.py), stopped afterwards."""
    from tests.hubroot import sas_hub

    broker = sas_hub(hub_pki)
    yield broker
    broker.stop()
