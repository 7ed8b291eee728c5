"""Run the SAS-verifying test hub standalone (demo, manual tests): loopback only.

    python3 -m tests.hubsim --dir DIR [--port 8883] [--hub NAME] [--device ID] [--module ID]
                            [--key-file FILE|-] [--websocket]

``--device ID --key-file FILE`` may be repeated: one identity per pair (a fleet).

Writes DIR/ca.pem (the CA to put in conf.json's ``ca_file``) and the server certificate
(valid for localhost, 127.0.0.1 and NAME), then serves until interrupted, printing one line per
CONNECT (client id, CONNACK code, why) and per message. The device key is read from a file or
standard input, never from the command line; without one a random key is made and written
to DIR/device.key (0600).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tests.hubsim.broker import Broker
from tests.hubsim.pki import Pki
from tests.hubsim.sasauth import SasAuth


def connect_line(conn) -> str:
    """One log line for a CONNECT, with the reason of that very CONNECT."""
    why = conn.reason or ("accepted" if conn.code == 0 else "refused")
    return (f"{time.strftime('%H:%M:%S', time.localtime(conn.opened))} CONNECT "
            f"{conn.client_id} -> CONNACK {conn.code} ({why})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.hubsim", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--hub", default="test-hub.azure-devices.net")
    parser.add_argument("--device", action="append", help="device id (repeatable)")
    parser.add_argument("--module", default="DefenderIotMicroAgent")
    parser.add_argument("--key-file", action="append",
                        help="file holding the base64 device key, or - (stdin); one per --device")
    parser.add_argument("--websocket", action="store_true", help="MQTT over WebSocket")
    args = parser.parse_args(argv)

    pki = Pki(args.dir, names=("localhost", args.hub))
    devices, key_files = args.device or ["dev1"], args.key_file or [None]
    if len(devices) != len(key_files):
        parser.error("give one --key-file per --device")
    keys = {}
    for device, key_file in zip(devices, key_files):
        if key_file == "-":
            key = sys.stdin.readline().strip()
        elif key_file:
            key = Path(key_file).read_text().strip()
        else:
            key = base64.b64encode(os.urandom(32)).decode()
            fd = os.open(args.dir / "device.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key + "\n")
        keys[(device, args.module)] = key
    auth = SasAuth(args.hub, keys)
    hub = Broker(auth=auth, tls=(pki.server_cert, pki.server_key), websocket=args.websocket)
    port = hub.start(args.port)
    print(f"hubsim: {args.hub} on 127.0.0.1:{port} ({'websocket' if args.websocket else 'mqtt'})"
          f", CA {pki.ca_file}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    seen_conns = seen_msgs = seen_twin = 0
    try:
        while not done.wait(0.2):
            for conn in hub.connections[seen_conns:]:
                print(connect_line(conn), flush=True)
            seen_conns = len(hub.connections)
            for client_id, topic, payload in hub.messages[seen_msgs:]:
                print(f"{time.strftime('%H:%M:%S')} {client_id} {topic}: "
                      f"{payload[:200].decode('utf-8', 'replace')}", flush=True)
            seen_msgs = len(hub.messages)
            for client_id, _, payload, _ in hub.twin_patches[seen_twin:]:
                print(f"{time.strftime('%H:%M:%S')} {client_id} twin reported: "
                      f"{payload[:300].decode('utf-8', 'replace')}", flush=True)
            seen_twin = len(hub.twin_patches)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
