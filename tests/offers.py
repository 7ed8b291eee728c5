"""Offers (what a machine is offered at boot) built in memory, for the unit and functional
tiers: ``offered(cs, cert, key)``, ``sas(seed)``, ``X509``, ``key_of(text)``."""

import base64

from defender_setup.offer import Offer
from tests.conftest import DEVICE, HUB, MODULE

CS, CERT, KEY = "connection_string.txt", "certificate_public.pem", "certificate_private.pem"
CRED = "run/credentials/@system"
NAMES = {CS: "defender-setup.connection-string", CERT: "defender-setup.certificate",
         KEY: "defender-setup.private-key"}


def sas(seed=1, device=DEVICE) -> bytes:
    key = base64.b64encode(bytes((seed + i) % 256 for i in range(32))).decode()
    return f"HostName={HUB};DeviceId={device};ModuleId={MODULE};SharedAccessKey={key}".encode()


def key_of(text: bytes) -> str:
    return text.decode().split("SharedAccessKey=")[1]


X509 = f"HostName={HUB};DeviceId={DEVICE};ModuleId={MODULE};x509=true".encode()


def credential_offer(**files) -> Offer:
    return Offer("credential", files, {n: f"/run/credentials/@system/{NAMES[n]}" for n in files})


def offered(cs=None, cert=None, key=None) -> Offer:
    files = {CS: cs, CERT: cert, KEY: key}
    return credential_offer(**{n: d for n, d in files.items() if d is not None})


# A plain SharedAccessKey set, as an answer would hold it (the debconf tests).
ANSWER_KEY = base64.b64encode(bytes(range(32))).decode()
ANSWER_CS = f"HostName=hub.azure-devices.net;DeviceId=dev1;ModuleId=DefenderIotMicroAgent;" \
    f"SharedAccessKey={ANSWER_KEY}"
