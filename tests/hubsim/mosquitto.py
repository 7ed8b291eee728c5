"""Debian's mosquitto as the hub for the X.509 path: TLS on loopback, client certificates
required and verified against the test CA, the certificate's CN taken as the user name.

Interface::

    with Mosquitto(pki, directory, port=None, host="127.0.0.1", twin="answer") as broker:
                                                # starts /usr/sbin/mosquitto, waits for the port
        broker.port; broker.log_text()           # the broker's own log (connections, refusals)
        broker.reported[(device, module)]        # module twins (tests/hubsim/twin.py)
        broker.twin_patches                      # [(client_id, topic, payload, received)]

Module twins: mosquitto itself knows nothing of them, so with ``twin="answer"`` a responder
(a paho client of this process, with a client certificate of the test CA) subscribes to the
reported PATCHes, merges them and publishes IoT Hub's answer on ``$iothub/twin/res/...``.
MQTT does not tell a subscriber who published, so a PATCH is put down to the identity that
connected last (from mosquitto's log): one device at a time, which is how the tests use it.
``twin="ignore"`` starts no responder (a hub that never answers).
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from tests.hubsim.twin import PATCH_PREFIX, Twins, answer_topic

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    def __init__(self, pki, directory: Path, port: int | None = None, host: str = "127.0.0.1",
                 twin: str = "answer"):
        self.pki, self.dir, self.host, self.twin = pki, Path(directory), host, twin
        self.port = port or free_port()
        self.log = self.dir / "mosquitto.log"
        self.proc = None
        self.twins = Twins()
        self.twin_patches: list[tuple] = []
        self._responder = None

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
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log_text()[-500:]}") from None
                time.sleep(0.05)
                continue
            if self.twin == "answer":
                self._responder = self._respond()
            return self
        raise RuntimeError("mosquitto did not listen")

    def __exit__(self, *exc):
        if self._responder is not None:
            self._responder.loop_stop()
            self._responder.disconnect()
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

    @property
    def reported(self) -> dict:
        return self.twins.reported

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _last_identity(self) -> tuple:
        clients = re.findall(r"New client connected from \S+ as (\S+) ", self.log_text())
        clients = [c for c in clients if c != RESPONDER]
        device, _, module = (clients[-1] if clients else "").partition("/")
        return device, module

    def _respond(self):
        import paho.mqtt.client as mqtt

        cert, key = self.pki.client(RESPONDER)
        version = getattr(mqtt, "CallbackAPIVersion", None)
        kwargs = {"client_id": RESPONDER, "protocol": mqtt.MQTTv311}
        client = (mqtt.Client(version.VERSION2, **kwargs) if version is not None
                  else mqtt.Client(**kwargs))
        # not create_default_context(): Python 3.13 makes it X.509-strict, which the test
        # CA's certificates are not (no Authority Key Identifier); the agent's isn't either
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the test's own broker, whichever loopback address
        ctx.load_verify_locations(cafile=str(self.pki.ca_file))
        ctx.load_cert_chain(str(cert), str(key))
        client.tls_set_context(ctx)
        subscribed = threading.Event()

        def on_message(client, _userdata, message):
            topic, payload = message.topic, bytes(message.payload)
            identity = self._last_identity()
            self.twin_patches.append(("/".join(identity), topic, payload, time.monotonic()))
            status, version = self.twins.patch(identity, payload)
            client.publish(answer_topic(topic, status, version), b"", qos=0)

        client.on_message = on_message
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect(self.host, self.port)
        client.subscribe(PATCH_PREFIX + "#", qos=0)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the twin responder could not subscribe to mosquitto")
        return client


RESPONDER = "hubsim-twin-responder"
