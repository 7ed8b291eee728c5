"""The IoT Hub connection of a module identity: MQTT 3.1.1 over TLS with paho-mqtt.

Interface (the runtime's connector seam, see :mod:`defender_setup.agent.runtime`)::

    HubConnector(root=Path("/"), settings=None, *, ready_timeout=10.0, backoff=(1.0, 60.0),
                 clock=time.time)
    .start(creds, notify)   # returns at once; notify.ready() once the first attempt has an
                            # outcome (the runtime sends READY=1 then, or after ready_timeout)
    .stop()                 # returns within STOP_WITHIN seconds, whatever the hub does
    .send(payload: bytes)   # queue a telemetry message (QoS 1, kept until the hub acks it)
    .state                  # "connecting" | "connected" | "retrying" | "rejected" | "stopped"

IoT Hub's MQTT conventions for a module identity: client id ``{device}/{module}``, user name
``{hub}/{device}/{module}/?api-version=2021-04-12``, telemetry on
``devices/{device}/modules/{module}/messages/events/``, QoS <= 1. TLS on 8883, or MQTT over
WebSocket on 443 at ``/$iothub/websocket``. With ``GatewayHostName`` TLS goes to the gateway
while the identity (user name, token resource) stays on ``HostName``. Trust: the system CA store,
or only the configured ``ca_file``.

Status texts (the unit's ``STATUS=``; ``defender-setup restart`` reads them):

- ``connected to HUB as DEVICE/MODULE``
- ``retrying: hub unreachable (KIND: reason)`` with KIND one of DNS, TCP, TLS, proxy, WebSocket,
  MQTT, timeout. Unreachable is never a credential error: the connector retries with capped
  exponential back-off and jitter and the service stays up. A hub that breaks the protocol
  (malformed, oversized or unexpected packets, a flood, an invalid CONNACK code) is unreachable
  too (``MQTT: <reason>``): a broken hub or a middlebox is a network condition. The back-off
  starts again from its base only after a connection stayed up STABLE_AFTER seconds, so a hub
  that accepts and then misbehaves at once is not hammered.

A rejection (CONNACK refused: not authorized, bad user name or password, identifier rejected,
protocol; or a TLS alert about the client certificate) is logged as one line naming the likely
cause and ends the process with :data:`EX_REJECTED` (76) so that ``defender-setup restart`` rolls
back. A settings error (conf.json, CA file, proxy without python3-socks) ends it with 78.

SAS tokens live ``sas_lifetime`` seconds; at 80 % of it the connector disconnects cleanly and
reconnects with a fresh token. Messages are removed from the queue only when the hub acks them,
so a renewal or a lost connection re-sends, never drops (at-least-once). A heartbeat (agent
version, uptime, OS release) is sent on connect and every ``heartbeat_interval`` seconds.
The module twin's reported properties (:mod:`.twin`) go over the same connection, as the same
identity: a PATCH on connect and on change, at most one per ``twin_interval`` seconds; the
twin's answers, or their absence, change nothing here.
paho is imported lazily; both its 1.x and 2.x APIs are supported. Nothing here logs a secret.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from defender_setup import AGENT_DIR, __version__
from defender_setup.agent import credsdir, hubnet, sas, twin
from defender_setup.agent import settings as settings_mod
from defender_setup.credentials import CERTIFICATE_FILE, PRIVATE_KEY_FILE
from defender_setup.errors import EX_CONFIG, EX_REJECTED, EX_SOFTWARE, SetupError

STOP_WITHIN = 1.5  # seconds stop() waits for the connection thread (TimeoutStopSec is 10)
STOP_DRAIN = 0.5  # of which: waiting for the hub to ack messages already sent
STABLE_AFTER = 60.0  # a connection that lasted this long resets the back-off
API_VERSION = "2021-04-12"
QUEUE_MAX = 1000
WARNING, INFO = 4, 6


@dataclass(frozen=True)
class Identity:
    """Who connects where; ``key`` (SAS) is hidden from repr."""

    host_name: str
    device_id: str
    module_id: str
    gateway_host_name: str | None = None
    key: str | None = field(default=None, repr=False)
    cert_file: Path | None = None
    key_file: Path | None = None
    thumbprint: str | None = None

    @property
    def client_id(self) -> str:
        return f"{self.device_id}/{self.module_id}"

    @property
    def username(self) -> str:
        return f"{self.host_name}/{self.device_id}/{self.module_id}/?api-version={API_VERSION}"

    @property
    def topic(self) -> str:
        return f"devices/{self.device_id}/modules/{self.module_id}/messages/events/"

    @property
    def resource(self) -> str:
        return sas.resource_uri(self.host_name, self.device_id, self.module_id)

    @property
    def connect_host(self) -> str:
        return self.gateway_host_name or self.host_name

    @property
    def name(self) -> str:
        return f"{self.host_name} as {self.device_id}/{self.module_id}"

    @classmethod
    def from_credentials(cls, creds, root: Path = Path("/")) -> Identity:
        """From a ``credentials.Validated`` (an Identity passes through); certificate files
        are used where they were loaded from (``creds.sources``: the service's credentials
        directory), else in the agent directory."""
        if isinstance(creds, cls):
            return creds
        cs = creds.connection_string
        agent_dir = Path(root) / AGENT_DIR
        x509 = creds.method == "certificate"

        def where(name):
            return creds.sources.get(name, agent_dir / name) if x509 else None

        return cls(cs.host_name, cs.device_id, cs.module_id, cs.gateway_host_name,
                   None if x509 else cs.shared_access_key,
                   where(CERTIFICATE_FILE), where(PRIVATE_KEY_FILE),
                   creds.certificate.sha1_thumbprint if x509 else None)


class Backoff:
    """Capped exponential back-off with jitter: 50-100 % of min(cap, base * 2**n)."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng=None):
        # os.urandom rather than the random module: no secrecy needed, but ~0.5 MB less
        self.base, self.cap, self.attempt = base, cap, 0
        self._rng = rng or (lambda: int.from_bytes(os.urandom(2), "big") / 65535)

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self.attempt = 0


class HubConnector:
    """See the module docstring."""

    def __init__(self, root: Path = Path("/"), settings=None, *, ready_timeout: float = 10.0,
                 backoff=(1.0, 60.0), clock=time.time):
        self.root = Path(root)
        self._settings = settings
        self.ready_timeout = ready_timeout
        self._backoff = Backoff(*backoff)
        self.twin: twin.Twin | None = None
        self._clock = clock
        self._queue: collections.deque = collections.deque(maxlen=QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._link = None
        self._started = time.monotonic()
        self.state = "stopped"
        self.connections = 0  # accepted connections so far (tests, bench)

    # -- seam ------------------------------------------------------------------------------
    def start(self, creds, notify) -> None:
        self._notify = notify
        # A fresh event and link per start: a thread stop() gave up waiting for (stuck in name
        # resolution) keeps seeing its own, set event and aborted link, and ends.
        self._stop = threading.Event()
        try:
            self.settings = self._settings or settings_mod.load(self.root, credsdir.directory())
            self.identity = Identity.from_credentials(creds, self.root)
            self._link = hubnet.Link(self.identity, self.settings)
        except SetupError as err:
            self.state = "rejected"
            notify.fail(EX_CONFIG, f"not starting: {err}")
            return
        self.twin = None
        if self.settings.twin_interval:
            try:
                report = twin.Report(creds, self.root)
                self.twin = twin.Twin(report.body, self.settings.twin_interval, log=notify.log)
            except Exception as err:  # a report is never worth the connection: see _twin
                self._twin_off(err)
        self.state = "connecting"
        self._backoff.reset()
        self._last_reason = None
        self._next_beat = 0.0  # the first heartbeat right after connecting
        self._ready_sent = False
        # What READY=1 carries if the first attempt has no outcome within ready_timeout (the
        # runtime sends the last status given; any outcome replaces this one).
        self._notify.status(f"retrying: hub unreachable (timeout: no answer from "
                            f"{self._link.where} within {self.ready_timeout:g} s)")
        self._thread = threading.Thread(target=self._run, args=(self._stop, self._link),
                                        name="hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._link is not None:
            self._link.abort()  # wakes a blocked connect, proxy, TLS handshake or upgrade
        if self._thread is not None:
            # Bounded: a thread still blocked (in name resolution, which nothing interrupts)
            # is a daemon thread with its own stop event: it ends on its own, or with us.
            self._thread.join(timeout=STOP_WITHIN)
            self._thread = None
        if self.state != "rejected":
            self.state = "stopped"

    def send(self, payload: bytes) -> None:
        self._queue.append(bytes(payload))

    # -- connector thread ------------------------------------------------------------------
    def _outcome(self) -> None:
        """The first attempt has an outcome: the runtime may send READY=1 now."""
        if not self._ready_sent:
            self._ready_sent = True
            ready = getattr(self._notify, "ready", None)
            if ready is not None:
                ready()

    def _run(self, stop: threading.Event, link) -> None:
        try:
            self._retry_loop(stop, link)
        except Exception as err:  # a bug: one line with its location, never a traceback
            import traceback

            where = traceback.extract_tb(err.__traceback__)[-1]
            self.state = "rejected"
            self._notify.fail(EX_SOFTWARE, f"internal error in the hub connection: "
                                           f"{type(err).__name__} at "
                                           f"{Path(where.filename).name}:{where.lineno}")

    def _retry_loop(self, stop: threading.Event, link) -> None:
        while not stop.is_set():
            self._up_since = None
            result = self._session(stop, link)
            if stop.is_set():
                return  # stopped during the attempt: its outcome is nobody's business now
            if result.kind == "rejected":
                self.state = "rejected"
                self._notify.fail(EX_REJECTED, result.text)
                return
            if result.kind == "renew":
                continue  # straight back in with a fresh token
            if result.kind == "stopped":
                return
            if self._up_since is not None and time.monotonic() - self._up_since >= STABLE_AFTER:
                self._backoff.reset()
            self.state = "retrying"
            self._notify.status(f"retrying: hub unreachable ({result.text})")
            self._outcome()
            if result.text != self._last_reason:  # one line per distinct reason, not per try
                self._notify.log(f"hub unreachable ({result.text}); retrying", WARNING)
                self._last_reason = result.text
            stop.wait(self._backoff.next())

    def _session(self, stop: threading.Event, link) -> hubnet.Result:
        token, lifetime = None, self.settings.sas_lifetime
        if self.identity.key is not None:
            token = sas.new_token(self.identity.resource, self.identity.key, lifetime,
                                  now=self._clock())
        session = link.open(token, self._clock, timeout=self.ready_timeout)
        if session.result is not None:
            return session.result
        self.connections += 1
        self._up_since = time.monotonic()
        self._last_reason = None
        previous, self.state = self.state, "connected"
        self._notify.status(f"connected to {self.identity.name}")
        self._outcome()
        if previous != "connected":  # not after a token renewal: that is routine
            self._notify.log(f"connected to {self.identity.name} via {link.where} "
                             f"({self.settings.transport})", INFO)
        renew_at = None
        if token is not None:
            # from the token's own expiry (whole seconds, so up to 1 s shorter than asked)
            left = token.expiry - self._clock()
            renew_at = time.monotonic() + max(1.0, left - lifetime + sas.renewal_delay(lifetime))
        if self.twin is not None:
            session.subscribe(twin.RESPONSES)
            self.twin.connected()
        try:
            while True:
                now = time.monotonic()
                if self.settings.heartbeat_interval and now >= self._next_beat:
                    self.send(self._heartbeat())
                    self._next_beat = now + self.settings.heartbeat_interval
                session.publish_from(self._queue, self.identity.topic)
                if self.twin is not None:
                    self._twin(session)
                if stop.is_set():
                    session.close(drain=STOP_DRAIN)
                    return hubnet.Result("stopped")
                if renew_at is not None and now >= renew_at:
                    # wait for outstanding acks, but well before the old token expires
                    session.close(drain=min(3.0, lifetime * 0.05))
                    return hubnet.Result("renew")
                lost = session.pump(0.5)
                if lost is not None:
                    return lost
        finally:
            session.close()
            session.requeue(self._queue)

    def _twin(self, session) -> None:
        """The twin's turn in the connection loop. A bug in it turns the twin off (one line)
        instead of ending the connection: the report must never change the agent's verdict."""
        try:
            while session.answers:
                self.twin.answer(session.answers.popleft())
            patch = self.twin.due()
            if patch is not None:
                session.publish_once(*patch)  # not queued: no answer, so tried again later
        except Exception as err:
            self._twin_off(err)

    def _twin_off(self, err: BaseException) -> None:
        import traceback

        where = traceback.extract_tb(err.__traceback__)[-1]
        self.twin = None
        self._notify.log(f"twin: reported properties turned off after an internal error: "
                         f"{type(err).__name__} at {Path(where.filename).name}:{where.lineno}",
                         WARNING)

    def _heartbeat(self) -> bytes:
        return json.dumps({
            "type": "heartbeat",
            "agentVersion": __version__,
            "uptimeSeconds": int(time.monotonic() - self._started),
            # PRETTY_NAME, read where the twin report reads it
            "osRelease": twin.os_release(self.root)["prettyName"] or "unknown",
        }, separators=(",", ":")).encode()
