"""A throw-away root wired to a test hub on loopback, for the probe and the network checks.

Interface::

    configure(root, pki=None, **settings)   # conf.json (and the test CA as ca_file) under root
    sas_text(key=KEY, gateway="localhost", ...) -> bytes        # a connection string
    validated(text, cert=None, key=None) -> credentials.Validated
    store(root, validated)                  # written through AgentDir, as apply does
    sas_hub(pki, **broker_options) -> Broker    # started; knows DEVICE/MODULE with KEY only

The identity stays on HUB while TLS goes to GatewayHostName (``localhost``, a name of the
test server certificate), as on a gateway: no resolver trick is needed on this machine.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.hubsim.broker import Broker
from tests.hubsim.sasauth import SasAuth

HUB = "testhub.azure-devices.net"
DEVICE, MODULE = "dev1", "DefenderIotMicroAgent"
KEY = base64.b64encode(b"hubroot-test-key-0123456789abcdef").decode()
WRONG_KEY = base64.b64encode(b"not-the-registered-key-012345678").decode()
CONF = "etc/defender_iot_micro_agent/conf.json"


def configure(root: Path, pki=None, **settings) -> Path:
    conf = Path(root) / CONF
    conf.parent.mkdir(parents=True, exist_ok=True)
    if pki is not None:  # ca_file is looked up under the root, like conf.json itself
        (conf.parent / "hub-ca.pem").write_bytes(Path(pki.ca_file).read_bytes())
        settings.setdefault("ca_file", "/etc/defender_iot_micro_agent/hub-ca.pem")
    conf.write_text(json.dumps(settings))
    return conf


def sas_text(key: str = KEY, gateway: str | None = "localhost", host: str = HUB,
             device: str = DEVICE, module: str = MODULE) -> bytes:
    text = f"HostName={host};DeviceId={device};ModuleId={module};SharedAccessKey={key}"
    return (text + (f";GatewayHostName={gateway}" if gateway else "")).encode()


def x509_text(gateway: str | None = "localhost", device: str = DEVICE) -> bytes:
    text = f"HostName={HUB};DeviceId={device};ModuleId={MODULE};x509=true"
    return (text + (f";GatewayHostName={gateway}" if gateway else "")).encode()


def validated(text: bytes, cert: bytes | None = None, key: bytes | None = None):
    from defender_setup.credentials import validate

    method = "certificate" if cert else "connection-string"
    return validate(method, text, cert, key)


def store(root: Path, creds) -> None:
    from defender_setup.agentdir import AgentDir

    AgentDir(root).write(creds.files)


def sas_hub(pki, **options) -> Broker:
    options.setdefault("tls", (pki.server_cert, pki.server_key))
    broker = Broker(auth=SasAuth(HUB, {(DEVICE, MODULE): KEY}), **options)
    broker.start()
    return broker
