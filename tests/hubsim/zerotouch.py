"""DPS, two hubs (MQTT + module REST) and their PKI together: what zero-touch provisioning meets.

Interface::

    with Stand(directory, id_scope=ID_SCOPE, hubs=HUBS) as stand:
        stand.dps (DpsSim), stand.hubs[name] -> Hub(broker, rest, auth)
        stand.endpoint          # "localhost:PORT": the --endpoint to give
        stand.conf(root)        # conf.json under root: trusts the test CA, the hubs' ports
        stand.device_cert(cn)   # (cert path, key path) signed by the device CA (X.509)

    python3 -m tests.hubsim.zerotouch --dir DIR [--id-scope SCOPE] [--hub NAME ...]
        [--group NAME=KEYFILE[@HUB]] [--individual REG=KEYFILE[@HUB]] [--x509-group NAME[@HUB]]
        [--device-cert CN] [--mqtt-port N] [--https-port N] [--dps-port N] [--polls N]

Hub names are IP addresses of the loopback network (``127.0.0.1``, ``127.0.0.2``): they
resolve everywhere without a resolver trick, are valid HostNames, and the test server
certificate names them; each hub's broker and REST API listen on its own address, on the same
two ports, so one conf.json (``port``, ``https_port``, ``ca_file``) serves both. DPS listens
on 127.0.0.1 and its certificate names ``localhost``.

The process writes DIR/ca.pem (the CA to trust: conf.json's ``ca_file``), DIR/device-ca.pem
(X.509 devices' issuer) and DIR/CN.pem + CN.key per ``--device-cert``, prints one line with the
ports, then one line per registration, module and CONNECT, and reads commands on standard
input, one per line: ``reassign REG HUB``, ``disable NAME``, ``enable NAME``, ``remove-device
DEVICE HUB``, ``throttle SECONDS`` / ``throttle off``. Keys are read from files, never argv.
SIGTERM or the end of standard input stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tests import certfactory
from tests.hubsim.broker import Broker
from tests.hubsim.dps import DpsSim
from tests.hubsim.hubrest import HubRest
from tests.hubsim.pki import Pki
from tests.hubsim.sasauth import SasAuth

ID_SCOPE = "0ne00000A0A"
HUBS = ("127.0.0.1", "127.0.0.2")


@dataclass
class Hub:
    name: str
    auth: SasAuth
    broker: Broker
    rest: HubRest


def _same_port(starts, port: int = 0) -> int:
    """Start each ``start(port)`` on one port: the one given, or else the first picks it and
    the rest follow (a port taken on another address makes all of them try again)."""
    if port:
        for start in starts:
            start(port)
        return port
    for _ in range(20):
        port, started = starts[0](0), 1
        try:
            for start in starts[1:]:
                start(port)
                started += 1
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every hub address")


class Stand:
    def __init__(self, directory: Path, id_scope: str = ID_SCOPE, hubs=HUBS, polls: int = 1,
                 mqtt_port: int = 0, https_port: int = 0, dps_port: int = 0):
        self.dir = Path(directory)
        self.pki = Pki(self.dir, names=("localhost",), ips=tuple(hubs))
        self.device_ca = certfactory.make_ca("Hubsim Device CA")
        self.device_ca_file = self.dir / "device-ca.pem"
        self.device_ca_file.write_bytes(self.device_ca.cert_pem)
        self.hubs: dict = {}
        for name in hubs:
            auth = SasAuth(name, {})
            broker = Broker(auth=auth, tls=(self.pki.server_cert, self.pki.server_key),
                            host=name)
            rest = HubRest(name, auth, self.pki, client_ca=self.device_ca_file, host=name)
            self.hubs[name] = Hub(name, auth, broker, rest)
        self._want = (mqtt_port, https_port, dps_port)
        self.dps = DpsSim(self.pki, id_scope, {n: h.rest for n, h in self.hubs.items()},
                          client_ca=self.device_ca_file, polls=polls)
        self.id_scope = id_scope
        self._n = 0

    def __enter__(self) -> Stand:
        mqtt, https, dps = self._want
        hubs = list(self.hubs.values())
        self.mqtt_port = _same_port([hub.broker.start for hub in hubs], mqtt)
        self.https_port = _same_port([hub.rest.start for hub in hubs], https)
        self.dps_port = self.dps.start(dps)
        self.endpoint = f"localhost:{self.dps_port}"
        return self

    def __exit__(self, *exc) -> None:
        self.dps.stop()
        for hub in self.hubs.values():
            hub.rest.stop()
            if hub.broker.port is not None:
                hub.broker.stop()

    def conf(self, root: Path, **more) -> Path:
        from tests import hubroot

        return hubroot.configure(root, self.pki, port=self.mqtt_port,
                                 https_port=self.https_port, **more)

    def device_cert(self, cn: str, issuer=None):
        """A device certificate (P-256) signed by the device CA (or ``issuer``); its paths."""
        self._n += 1
        key = certfactory.private_key("p256", 500 + self._n)
        ident = certfactory.make_identity(cn, key=key, issuer=issuer or self.device_ca)
        cert, key_path = self.dir / f"{cn}.pem", self.dir / f"{cn}.key"
        cert.write_bytes(ident.cert_pem)
        key_path.write_bytes(ident.key_pem)
        key_path.chmod(0o600)
        return cert, key_path


# -- the process ------------------------------------------------------------------------------
def _target(spec: str, first_hub: str):
    name, _, rest = spec.partition("=")
    value, _, hub = (rest or name).partition("@")
    return name, value, hub or first_hub


def _key(path: str) -> str:
    return Path(path).read_text().strip()


def _command(stand: Stand, line: str) -> str:
    words = line.split()
    try:
        if words[:1] == ["reassign"]:
            stand.dps.reassign(words[1], words[2])
        elif words[:1] in (["disable"], ["enable"]):
            stand.dps.disable(words[1], words[0] == "disable")
        elif words[:1] == ["remove-device"]:
            stand.hubs[words[2]].rest.remove_device(words[1])
        elif words[:1] == ["throttle"]:
            stand.dps.throttle = None if words[1] == "off" else float(words[1])
        else:
            return f"unknown command: {line.strip()}"
    except (IndexError, KeyError, ValueError, TypeError) as exc:
        return f"cannot {line.strip()}: {exc!r}"
    return f"done: {line.strip()}"


def _report(stand: Stand, seen: dict) -> None:
    """Print what happened since the last call: registrations, modules, CONNECTs."""
    for reg, state in list(stand.dps.registrations.items()):
        key = (reg, state.get("etag"))
        if key not in seen:
            seen[key] = True
            print(f"registered {reg} -> {state['assignedHub']} ({state['substatus']})",
                  flush=True)
    for hub in stand.hubs.values():
        for ident in list(hub.rest.modules):
            if (hub.name, ident, hub.rest.modules.get(ident)) not in seen:
                seen[(hub.name, ident, hub.rest.modules.get(ident))] = True
                print(f"module {ident[0]}/{ident[1]} set on {hub.name}", flush=True)
        n = seen.get(("conns", hub.name), 0)
        for conn in hub.broker.connections[n:]:
            print(f"CONNECT {conn.client_id} on {hub.name} -> CONNACK {conn.code} "
                  f"({conn.reason or 'accepted'})", flush=True)
        seen[("conns", hub.name)] = len(hub.broker.connections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.hubsim.zerotouch",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--id-scope", default=ID_SCOPE)
    parser.add_argument("--hub", action="append", help="a hub's name (an address of lo)")
    parser.add_argument("--group", action="append", default=[], help="NAME=KEYFILE[@HUB]")
    parser.add_argument("--individual", action="append", default=[], help="REG=KEYFILE[@HUB]")
    parser.add_argument("--x509-group", action="append", default=[], help="NAME[@HUB]")
    parser.add_argument("--device-cert", action="append", default=[], metavar="CN")
    parser.add_argument("--mqtt-port", type=int, default=0)
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--dps-port", type=int, default=0)
    parser.add_argument("--polls", type=int, default=1)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    hubs = tuple(args.hub or HUBS)
    stand = Stand(args.dir, args.id_scope, hubs, args.polls, args.mqtt_port, args.https_port,
                  args.dps_port)
    for spec in args.group:
        name, path, hub = _target(spec, hubs[0])
        stand.dps.group(name, _key(path), hub)
    for spec in args.individual:
        reg, path, hub = _target(spec, hubs[0])
        stand.dps.individual(reg, _key(path), hub)
    for spec in args.x509_group:
        name, _, hub = _target(spec, hubs[0])
        stand.dps.x509_group(name, hub)
    for cn in args.device_cert:
        stand.device_cert(cn)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def commands():
        for line in sys.stdin:
            if line.strip():
                print(_command(stand, line), flush=True)
        done.set()

    with stand:
        print(json.dumps({"dps": stand.endpoint, "id_scope": stand.id_scope, "hubs": hubs,
                          "mqtt_port": stand.mqtt_port, "https_port": stand.https_port,
                          "ca_file": str(stand.pki.ca_file),
                          "device_ca": str(stand.device_ca_file)}), flush=True)
        threading.Thread(target=commands, daemon=True).start()
        seen: dict = {}
        while not done.wait(0.2):
            _report(stand, seen)
        _report(stand, seen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
