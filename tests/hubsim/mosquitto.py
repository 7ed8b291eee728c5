"""Debian's mosquitto as the hub for the X.509 path: TLS on loopback, client certificates
required and verified against the test CA, the certificate's CN taken as the user name.

Interface::

    with Mosquitto(pki, directory, port=None, host="127.0.0.1") as broker:
                                                # starts /usr/sbin/mosquitto, waits for the port
        broker.port; broker.log_text()           # the broker's own log (connections, refusals)
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    def __init__(self, pki, directory: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.pki, self.dir, self.host = pki, Path(directory), host
        self.port = port or free_port()
        self.log = self.dir / "mosquitto.log"
        self.proc = None

    def __enter__(self):
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"per_listener_settings true\n"
            f"listener {self.port} {self.host}\n"
            f"cafile {self.pki.ca_file}\n"
            f"certfile {self.pki.server_cert}\n"
            f"keyfile {self.pki.server_key}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "allow_anonymous false\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            "persistence false\n"
            "user root\n"  # as root it would switch to mosquitto, which cannot read 0600 keys
        )
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log_text()[-500:]}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""
