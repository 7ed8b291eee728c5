"""One IoT Hub connection with paho-mqtt: TLS context, connect, CONNACK, publish, and the
classification of every failure into a :class:`Result` with a one-line reason.

Interface (used by :mod:`defender_setup.agent.hub`)::

    link = Link(identity, settings)           # raises SetupError: CA file, client cert, proxy
    session = link.open(token, clock, timeout, addresses=None)  # addresses: the first hop's,
                                                # resolved already (mqttclient.open_tcp)
    session.result        # None when the hub accepted the identity, else a Result
    session.publish_from(queue, topic); session.pump(seconds) -> Result | None
    session.subscribe(topic_filter); session.publish_once(topic, payload) -> bool  # QoS 0
    session.answers       # deque of the topics of messages the hub sent us (the twin's)
    session.close(drain=seconds); session.requeue(queue)

    link.abort()          # from another thread: ends the attempt in progress, and any later

``Result.kind`` is ``unreachable`` (text ``KIND: reason``, KIND in DNS, TCP, TLS, proxy,
WebSocket, MQTT), ``rejected`` (text: the journal line naming the likely cause; ``answer`` is
the hub's answer alone, e.g. ``CONNACK 5, not authorized``, and ``cause`` the likely causes
alone, for callers that phrase their own line), ``lost``, ``renew`` or ``stopped``.

An attempt (TCP, proxy, TLS, WebSocket upgrade, CONNACK) is over within ``timeout`` seconds,
name resolution aside (glibc's own timeouts; none with ``addresses``). A hub that breaks the
protocol (malformed or oversized packets, a flood) is ``unreachable`` with ``MQTT: <reason>``,
never an exception: see :mod:`defender_setup.agent.mqttclient`, which holds paho. What a peer
says (a proxy's answer) reaches a ``Result`` with control characters escaped. paho is driven
with ``loop()`` from the caller's thread and starts no thread of its own. Both paho 1.x and 2.x
(CallbackAPIVersion) are handled; callbacks take ``*args`` because the two APIs differ only
after the third one.
"""

from __future__ import annotations

import collections
import socket
import ssl
import time

from defender_setup.agent.mqttclient import Aborter, TlsContext, client_class, load_paho
from defender_setup.agent.settings import socks_for

# Result and the refusal texts live in verdicts; named here too, where callers look for them.
from defender_setup.agent.verdicts import CERT_ALERTS, Result, certificate_refused, connack_verdict
from defender_setup.errors import SetupError, printable

# paho 2.x reports MQTT 3.1.1 return codes converted to MQTT 5 reason codes.
# (paho 2 maps every code above 5 to 128 "Unspecified error": the raw code is kept first.)
_V5_TO_V311 = {132: 1, 133: 2, 134: 4, 135: 5, 136: 3, 137: 3, 140: 5, 159: 3}
WS_PATH = "/$iothub/websocket"
KEEPALIVE = 60
INFLIGHT_MAX = 20
# Topics of messages from the hub kept until the connector reads them (twin answers: one
# PATCH at a time is outstanding, so a handful is plenty; a flood only pushes old ones out).
ANSWERS_MAX = 16
TWIN_PREFIX = "$iothub/twin/res/"
# Answers (PUBACKs, PINGRESPs) paho may queue for a hub that does not read them: the agent
# itself has at most INFLIGHT_MAX messages out, so anything near this is a flood.
BACKLOG_MAX = 1000


def _no_password(*_):
    # An encrypted key would otherwise make OpenSSL prompt on the (absent) terminal.
    raise ValueError("the private key is encrypted; the agent needs an unencrypted key")


def _reason(err: BaseException) -> str:
    """A short, single-line reason (statuses and journal lines are one line each)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        text = f"certificate verify failed: {err.verify_message}"
    elif isinstance(err, ssl.SSLError):
        text = (err.reason or str(err)).replace("_", " ").lower()
    else:
        text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    # a proxy's refusal quotes its own answer: no escape sequence reaches a terminal
    return printable(" ".join(str(text).split())[:200])


class Link:
    """Connection parameters of one identity; :meth:`open` makes one attempt."""

    def __init__(self, identity, settings):
        self.identity, self.settings = identity, settings
        self.mqtt = load_paho()
        self.host, self.port = identity.connect_host, settings.hub_port
        self.where = f"{self.host}:{self.port}"  # how every line names the hub (or gateway)
        self.aborter = Aborter()
        if settings.proxy is not None:  # mqttclient.open_tcp needs it: say so now
            socks_for(settings.proxy)
        # One context for the link's life: loading the CA store once saves CPU and ~2 MB of
        # duplicate certificates; it also fails early, as a settings error, on a bad file.
        self.ctx = self.context()

    def context(self) -> TlsContext:
        ctx = TlsContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca_file = self.settings.ca_file
        try:
            if ca_file is not None:
                ctx.load_verify_locations(cafile=str(ca_file))
            else:
                # The hashed directory (ca-certificates keeps it) is read lazily, one CA when
                # a chain needs it; load_default_certs() would parse the whole bundle up
                # front: ~1.7 MB resident for ~140 roots of which the hub needs one.
                capath = ssl.get_default_verify_paths().capath
                if capath:
                    ctx.load_verify_locations(capath=capath)
                else:
                    ctx.load_default_certs()
        except (OSError, ssl.SSLError) as err:
            raise SetupError(f"conf.json: ca_file {ca_file}: cannot load: {_reason(err)}") from None
        if self.identity.cert_file is not None:
            try:
                ctx.load_cert_chain(str(self.identity.cert_file), str(self.identity.key_file),
                                    password=_no_password)
            except (OSError, ssl.SSLError, ValueError) as err:
                raise SetupError(f"cannot load the client certificate and key: {_reason(err)}"
                                 ) from None
        return ctx

    def _client(self):
        mqtt = self.mqtt
        transport = "websockets" if self.settings.transport == "websocket" else "tcp"
        kwargs = dict(client_id=self.identity.client_id, clean_session=True,
                      protocol=mqtt.MQTTv311, transport=transport)
        cls = client_class(mqtt)
        version = getattr(mqtt, "CallbackAPIVersion", None)
        if version is not None:  # paho 2.x
            return cls(version.VERSION2, reconnect_on_failure=False, **kwargs)
        # paho 1.5 (Debian 11) has no reconnect_on_failure; look before calling, since a failed
        # constructor leaves an object whose __del__ prints a traceback to the journal.
        if "reconnect_on_failure" in mqtt.Client.__init__.__code__.co_varnames:
            kwargs["reconnect_on_failure"] = False
        return cls(**kwargs)

    def abort(self) -> None:
        """Thread-safe: end the attempt in progress now, and refuse every later one."""
        self.aborter.fire()

    def open(self, token, clock, timeout: float, addresses=None) -> Session:
        deadline = time.monotonic() + timeout
        ctx = self.ctx
        ctx.begin(deadline)
        client = self._client()
        client.attempt = (self.settings.proxy, deadline, self.aborter, addresses)
        client.tls_set_context(ctx)
        if self.settings.transport == "websocket":
            client.ws_set_options(path=WS_PATH)
        client.username_pw_set(self.identity.username, token.text if token else None)
        session = Session(self, client, ctx, token, clock)
        session.connect(timeout)
        return session


class Session:
    """One paho client from CONNECT to close; see the module docstring."""

    def __init__(self, link: Link, client, ctx: TlsContext, token, clock):
        self.link, self.client, self.ctx, self.token, self.clock = link, client, ctx, token, clock
        self.result: Result | None = None
        self.connack: int | None = None
        self.disconnected = False
        self.inflight: dict = {}
        self.answers = collections.deque(maxlen=ANSWERS_MAX)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect

    def _loop(self, seconds: float) -> int:
        """paho's loop(); paho lets a TLS error (e.g. an alert) escape from it: keep it."""
        try:
            rc = self.client.loop(seconds)
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            if self.ctx.last_error is None:
                self.ctx.last_error = err
            self.disconnected = True
            return self.link.mqtt.MQTT_ERR_CONN_LOST
        if rc == 0 and self.client.backlog() > BACKLOG_MAX:
            self.client.refuse("flood", f"over {BACKLOG_MAX} answers not read by the hub")
            self.disconnected = True
            return self.link.mqtt.MQTT_ERR_CONN_LOST
        return rc

    # paho callbacks: (client, userdata, flags, rc[, properties]) / (client, userdata, mid, ...)
    def _on_connect(self, *args):
        raw = getattr(args[0], "raw_connack", None)  # the 3.1.1 code as the hub sent it
        if raw is not None:
            self.connack = raw
            return
        rc = args[3]
        code = int(getattr(rc, "value", rc))
        self.connack = _V5_TO_V311.get(code, code)

    def _on_publish(self, *args):
        self.inflight.pop(args[2], None)

    def _on_disconnect(self, *args):
        self.disconnected = True

    def _on_message(self, *args):
        # Called from inside paho's packet handling, where an exception would end the
        # connection: whatever the hub sends here, nothing is raised.
        try:
            topic = args[2].topic
        except Exception:  # noqa: BLE001  (a topic that is not UTF-8, say)
            return
        if isinstance(topic, str) and topic.startswith(TWIN_PREFIX) and len(topic) < 256:
            self.answers.append(topic)

    def connect(self, timeout: float) -> None:
        try:
            self._connect(timeout)
        finally:
            self.link.aborter.release()  # the blocking steps are over
            self.ctx.end()
        if self.result is not None:
            self.close()

    def _connect(self, timeout: float) -> None:
        where = self.link.where
        try:
            self.client.connect(self.link.host, self.link.port, keepalive=KEEPALIVE)
        except Exception as err:  # every failure becomes one classified line, never a traceback
            self.result = self._connect_error(err, where, timeout)
            return
        while self.connack is None:
            rc = self._loop(0.2)
            if self.connack is not None:
                break
            if self.link.aborter.fired:
                self.result = Result("stopped")
                return
            if rc != 0 or self.disconnected:
                self.result = self._closed_before_connack(where)
                break
            if time.monotonic() > self.ctx.deadline:
                self.result = Result("unreachable", f"MQTT: no answer to CONNECT from {where} "
                                                    f"within {timeout:g} s")
                break
        if self.connack is None and getattr(self.client, "raw_connack", None):
            self.result = None  # paho 1 reports CONNACK 1 as a bare protocol error
            self.connack = self.client.raw_connack
        if self.result is None and self.connack != 0:
            self.result = self._refused(self.connack)

    def _connect_error(self, err, where, timeout) -> Result:
        if isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLCertVerificationError):
            return self._tls_failure(err, where)  # it may be a refusal of our certificate
        return Result("unreachable", self._unreachable(err, where, timeout))

    def _unreachable(self, err, where, timeout) -> str:
        """Why connecting failed, as ``KIND: reason``."""
        host, phase = self.link.host, self.ctx.phase
        if type(err).__module__.startswith("socks"):
            return f"proxy: {_reason(err)}"
        if isinstance(err, socket.gaierror):
            return f"DNS: cannot resolve {host}: {err.strerror}"
        if isinstance(err, ssl.SSLCertVerificationError):  # ssl.CertificateError too
            return f"TLS: {host} is not trusted: {err.verify_message}"
        upgrade = phase == "upgrade" and self.link.settings.transport == "websocket"
        timeout_error = isinstance(err, (socket.timeout, TimeoutError))
        if type(err).__name__ == "WebsocketConnectionError" or (
                upgrade and isinstance(err, OSError)):
            if timeout_error:
                return f"WebSocket: no answer to the upgrade from {where}{WS_PATH} within " \
                       f"{timeout:g} s"
            return f"WebSocket: {where}{WS_PATH}: {_reason(err)}"
        if timeout_error and phase != "tcp":
            return f"TLS: no answer to the TLS handshake from {where} within {timeout:g} s"
        if timeout_error:
            return f"TCP: timed out connecting to {where}"
        if isinstance(err, ConnectionRefusedError):
            return f"TCP: connection refused by {where}"
        if isinstance(err, ConnectionError) and phase != "tcp":
            # a reset is how a peer closes with our ClientHello still unread: same as an EOF
            return f"TLS: {where} closed the connection during the TLS handshake"
        if isinstance(err, OSError):
            return f"{'TCP' if phase == 'tcp' else 'TLS'}: {where}: {_reason(err)}"
        return f"TCP: {where}: {type(err).__name__}"

    def _tls_failure(self, err: ssl.SSLError, where: str) -> Result:
        alert = CERT_ALERTS.get(err.reason or "")
        ident = self.link.identity
        if alert and ident.cert_file is not None:
            return certificate_refused(ident, alert, self.clock())
        if isinstance(err, ssl.SSLEOFError) or err.reason in (None, "UNEXPECTED_EOF_WHILE_READING"):
            return Result("unreachable",
                          f"TLS: {where} closed the connection during the TLS handshake")
        return Result("unreachable", f"TLS: {where}: {_reason(err)}")

    def _protocol_error(self) -> Result | None:
        """The hub broke MQTT (see mqttclient): a network condition, never a rejection."""
        error = getattr(self.client, "protocol_error", None)
        if error is None:
            return None
        reason, detail = error
        return Result("unreachable", f"MQTT: {reason} from {self.link.where}"
                                     + (f" ({detail})" if detail else ""))

    def _closed_before_connack(self, where: str) -> Result:
        broken = self._protocol_error()
        if broken is not None:
            return broken
        err = self.ctx.last_error
        if isinstance(err, ssl.SSLError):
            return self._tls_failure(err, where)
        return Result("unreachable",
                      f"MQTT: {where} closed the connection before answering CONNECT")

    def _refused(self, code: int) -> Result:
        return connack_verdict(code, self.link.identity, self.link.host, self.link.where,
                               self.token, self.clock())

    # -- connected -------------------------------------------------------------------------
    def publish_from(self, queue, topic: str) -> None:
        while queue and len(self.inflight) < INFLIGHT_MAX:
            payload = queue.popleft()
            try:
                info = self.client.publish(topic, payload, qos=1)
            except OSError:  # the next pump() reports the lost connection
                info = None
            if info is None or info.rc != 0:  # kept, in its place, for the next try
                queue.appendleft(payload)
                return
            self.inflight[info.mid] = payload

    def subscribe(self, topic_filter: str) -> None:
        """QoS 0; a refusal (SUBACK 0x80) only means no answers will come."""
        try:
            self.client.subscribe(topic_filter, qos=0)
        except (OSError, ValueError):  # the next pump() reports a lost connection
            pass

    def publish_once(self, topic: str, payload: bytes) -> bool:
        """QoS 0, outside the acknowledged queue (a twin request is answered on its own
        topic); False when paho could not queue it."""
        try:
            return self.client.publish(topic, payload, qos=0).rc == 0
        except (OSError, ValueError):
            return False

    def pump(self, seconds: float) -> Result | None:
        rc = self._loop(seconds)
        if rc == 0 and not self.disconnected:
            return None
        err = self.ctx.last_error
        why = _reason(err) if err is not None else self.link.mqtt.error_string(rc).rstrip(".")
        # the hub that broke MQTT says so first
        return self._protocol_error() or Result("lost", f"MQTT: connection to {self.link.where} "
                                                        f"lost: {why.lower()}")

    def close(self, drain: float = 0.0) -> None:
        client = self.client
        if client is None:
            return
        deadline = time.monotonic() + drain
        while self.inflight and not self.disconnected and time.monotonic() < deadline:
            if self._loop(0.1) != 0:
                break
        if not self.disconnected and client.socket() is not None:
            try:
                client.disconnect()
            except OSError:
                self.disconnected = True
            for _ in range(10):  # DISCONNECT is written by the loop, which then closes
                if client.socket() is None or self._loop(0.05) != 0:
                    break
        sock = client.socket()
        if sock is not None:
            sock.close()
        # Break the client <-> callback cycle so the sockets are freed at once.
        client.on_connect = client.on_publish = client.on_disconnect = client.on_message = None
        self.client = None

    def requeue(self, queue) -> None:
        """Put unacknowledged messages back at the front, in their order, to be re-sent."""
        for mid in sorted(self.inflight, reverse=True):
            queue.appendleft(self.inflight[mid])
        self.inflight.clear()
