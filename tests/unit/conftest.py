"""Fixtures shared by the unit tests: credential inputs generated at test time."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import pytest

from tests import certfactory

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
    """A throw-away root directory standing in for /."""
    return tmp_path / "root"


@pytest.fixture(scope="module")
def hub_pki(tmp_path_factory):
    """The test hub's CA and server certificate (tests/hubsim/pki.py), one per test module."""
    from tests.hubsim.pki import Pki

    return Pki(tmp_path_factory.mktemp("hub-pki"))


@pytest.fixture
def sas_broker(hub_pki):
    """The SAS-verifying test hub on loopback (tests/unit/hubroot.py), stopped afterwards."""
    from .hubroot import sas_hub

    broker = sas_hub(hub_pki)
    yield broker
    broker.stop()
