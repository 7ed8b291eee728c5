"""A small asyncio MQTT 3.1.1 broker acting as the hub, in a background thread.

Interface::

    hub = Broker(auth=callable(client_id, username, password) -> connack code,
                 tls=(cert_file, key_file), websocket=False, mode="normal", clock=time.time,
                 twin="answer")
    port = hub.start(port=0)     # on host (default 127.0.0.1; loopback only)
    hub.connections              # list of Conn records (client_id, username, code, sni, ...)
    hub.messages                 # list of (client_id, topic, payload bytes), telemetry only
    hub.twin_patches             # list of (client_id, topic, payload, time.monotonic() received)
    hub.reported[(device, module)]   # the module twin's reported properties, merged as IoT Hub
                                     # does ($version included)
    hub.wait_for(predicate, timeout)
    hub.stop()

Packets: CONNECT/CONNACK, PUBLISH (QoS 0/1)/PUBACK, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP,
DISCONNECT. With ``websocket=True`` it speaks MQTT over WebSocket (RFC 6455, subprotocol
``mqtt``) at ``/$iothub/websocket``; like IoT Hub's 443 it answers any other HTTP request
(404), and every HTTP answer carries a ``Date`` header from ``clock``, so a test hub can
pretend its clock is off (``clock=lambda: time.time() - 600``). ``mode`` makes it misbehave:
``"silent"`` accepts TCP+TLS and never answers CONNECT; ``"drop-tls"`` closes every
connection before the TLS handshake; ``connack=N`` answers every CONNECT with code N. With
``expire=True`` a connection is closed when the SAS token it authenticated with expires (as
IoT Hub does), using ``auth.last_expiry``.

The module twin, as IoT Hub's MQTT 3.1.1 surface has it: a PUBLISH to
``$iothub/twin/PATCH/properties/reported/?$rid=N`` is merged into that identity's reported
properties (a JSON merge: ``null`` removes a key; keys holding ``.``, ``$``, a space or a
control character, a body that is not a JSON object, are refused with 400) and answered on
``$iothub/twin/res/204/?$rid=N&$version=V`` to a connection that subscribed to
``$iothub/twin/res/#``. ``twin="ignore"`` records the PATCH and never answers;
``twin="fail"`` answers ``twin_status`` (default 500) and keeps nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate

from tests.hubsim.twin import PATCH_PREFIX, RESPONSES, Twins, answer_topic

WS_PATH = "/$iothub/websocket"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Conn:
    client_id: str = ""
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    code: int | None = None
    reason: str = ""  # why this CONNECT got its code (the auth's last_reason, taken at once)
    sni: str | None = None
    transport: str = "mqtt"
    opened: float = field(default_factory=time.time)
    closed: float | None = None


class _Ws:
    """Reads and writes MQTT bytes inside WebSocket binary frames (server side)."""

    def __init__(self, reader, writer, clock=time.time):
        self.reader, self.writer, self.buf = reader, writer, bytearray()
        self.date = b"Date: " + formatdate(clock(), usegmt=True).encode() + b"\r\n"

    async def handshake(self) -> bool:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (lines[0].split(" ") + ["", "", ""])[:3]
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if method != "GET" or path != WS_PATH or headers.get("upgrade", "").lower() != "websocket" \
                or not key:
            self.writer.write(b"HTTP/1.1 404 Not Found\r\n" + self.date +
                              b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            await self.writer.drain()
            return False
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        self.writer.write(b"HTTP/1.1 101 Switching Protocols\r\n" + self.date +
                          b"Upgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                          b"\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
        await self.writer.drain()
        return True

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            b0, b1 = await self.reader.readexactly(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            mask = await self.reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
            raw = await self.reader.readexactly(length)
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(raw))
            if opcode == 8:
                raise asyncio.IncompleteReadError(b"", n)
            if opcode == 9:
                self._frame(0xA, data)
            elif opcode in (0, 1, 2):
                self.buf += data
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    def write(self, data: bytes) -> None:
        self._frame(0x2, data)

    def _frame(self, opcode: int, data: bytes) -> None:
        n = len(data)
        if n < 126:
            head = bytes([0x80 | opcode, n])
        elif n < 65536:
            head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
        else:
            head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
        self.writer.write(head + data)


class _Raw:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def readexactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    def write(self, data: bytes) -> None:
        self.writer.write(data)


def wait_until(cond: threading.Condition, predicate, timeout: float) -> bool:
    """Wait on ``cond`` until ``predicate()`` holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    with cond:
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(min(left, 0.1))
    return True


def _str(buf: bytes, pos: int):
    (n,) = struct.unpack_from("!H", buf, pos)
    return buf[pos + 2:pos + 2 + n], pos + 2 + n


class Broker:
    def __init__(self, auth=None, tls=None, websocket=False, mode="normal", connack=None,
                 expire=False, client_ca=None, clock=time.time, host="127.0.0.1",
                 twin="answer", twin_status=500):
        self.auth = auth or (lambda *_: 0)
        self.host = host
        self.tls, self.websocket, self.mode = tls, websocket, mode
        self.connack, self.expire, self.client_ca = connack, expire, client_ca
        self.clock = clock
        self.connections: list[Conn] = []
        self.messages: list[tuple] = []
        self.twin, self.twin_status = twin, twin_status
        self.twin_patches: list[tuple] = []
        self.twins = Twins()
        self.tls_failures = 0
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None
        self._sni: dict = {}
        self.port = None

    # -- control (test thread) --------------------------------------------------------------
    def start(self, port: int = 0) -> int:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(port), self._loop)
        self.port = fut.result(10)
        return self.port

    def stop(self) -> None:
        async def close():
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        return wait_until(self._cond, predicate, timeout)

    def accepted(self):
        return [c for c in self.connections if c.code == 0]

    # -- server (loop thread) ---------------------------------------------------------------
    def _ssl_context(self):
        if not self.tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.tls)
        if self.client_ca:
            ctx.load_verify_locations(cafile=str(self.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED

        def sni(sslobj, name, _ctx):
            self._sni[id(sslobj)] = name
        ctx.sni_callback = sni
        return ctx

    async def _start(self, port: int) -> int:
        if self.mode == "drop-tls":
            self._server = await asyncio.start_server(self._drop, self.host, port)
        else:
            self._server = await asyncio.start_server(
                self._serve, self.host, port, ssl=self._ssl_context(),
                ssl_handshake_timeout=10)
        return self._server.sockets[0].getsockname()[1]

    async def _drop(self, reader, writer):
        await reader.read(5)  # the start of a ClientHello, then hang up
        writer.close()

    def _record(self, fn):
        with self._cond:
            fn()
            self._cond.notify_all()

    async def _serve(self, reader, writer):
        sslobj = writer.get_extra_info("ssl_object")
        conn = Conn(sni=self._sni.pop(id(sslobj), None), transport="websocket" if self.websocket
                    else "mqtt")
        stream = _Ws(reader, writer, self.clock) if self.websocket else _Raw(reader, writer)
        try:
            if self.websocket and not await stream.handshake():
                return
            await self._session(stream, conn)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            pass
        finally:
            self._record(lambda: setattr(conn, "closed", time.time()))
            writer.close()

    async def _packet(self, stream):
        first = (await stream.readexactly(1))[0]
        length, mult = 0, 1
        while True:
            byte = (await stream.readexactly(1))[0]
            length += (byte & 0x7F) * mult
            mult *= 128
            if not byte & 0x80:
                break
        return first, (await stream.readexactly(length) if length else b"")

    async def _session(self, stream, conn: Conn):
        first, body = await self._packet(stream)
        if first >> 4 != 1:
            return
        if self.mode == "silent":
            await asyncio.sleep(3600)
        proto, pos = _str(body, 0)
        level, flags = body[pos], body[pos + 1]
        pos += 4
        client_id, pos = _str(body, pos)
        if flags & 0x04:  # will topic and message
            _, pos = _str(body, pos)
            _, pos = _str(body, pos)
        username = password = None
        if flags & 0x80:
            raw, pos = _str(body, pos)
            username = raw.decode()
        if flags & 0x40:
            password, pos = _str(body, pos)
        conn.client_id, conn.username, conn.password = client_id.decode(), username, password
        if proto != b"MQTT" or level != 4:
            code = 1
        elif self.connack is not None:
            code = self.connack
        else:
            code = self.auth(conn.client_id, username, password)
            conn.reason = getattr(self.auth, "last_reason", "")
        expiry = getattr(self.auth, "last_expiry", None) if code == 0 else None
        self._record(lambda: (setattr(conn, "code", code), self.connections.append(conn)))
        stream.write(bytes([0x20, 2, 0, code]))
        if code != 0:
            return
        timeout = None
        subscribed: set = set()
        while True:
            if self.expire and expiry is not None:
                timeout = expiry - time.time()
                if timeout <= 0:
                    return  # token expired: the hub drops the connection
            first, body = await asyncio.wait_for(self._packet(stream), timeout)
            kind = first >> 4
            if kind == 3:  # PUBLISH
                qos = (first >> 1) & 3
                topic, pos = _str(body, 0)
                if qos:
                    (mid,) = struct.unpack_from("!H", body, pos)
                    pos += 2
                payload = body[pos:]
                message = (conn.client_id, topic.decode(), payload)
                if message[1].startswith(PATCH_PREFIX):
                    patch = (*message, time.monotonic())
                    self._record(lambda m=patch: self.twin_patches.append(m))
                    self._twin_patch(stream, conn, message[1], payload, subscribed)
                else:
                    self._record(lambda m=message: self.messages.append(m))
                if qos:
                    stream.write(bytes([0x40, 2]) + struct.pack("!H", mid))
            elif kind == 8:  # SUBSCRIBE
                (mid,) = struct.unpack_from("!H", body, 0)
                pos, granted = 2, []
                while pos < len(body):
                    topic_filter, pos = _str(body, pos)
                    subscribed.add(topic_filter.decode())
                    granted.append(min(body[pos], 1))
                    pos += 1
                stream.write(bytes([0x90, 2 + len(granted)]) + struct.pack("!H", mid)
                             + bytes(granted))
            elif kind == 12:  # PINGREQ
                stream.write(bytes([0xD0, 0]))
            elif kind == 14:  # DISCONNECT
                return

    # -- the module twin (loop thread) ------------------------------------------------------
    @property
    def reported(self) -> dict:
        return self.twins.reported

    def _twin_patch(self, stream, conn: Conn, topic: str, payload: bytes, subscribed) -> None:
        if self.twin == "ignore":
            return
        identity = tuple(conn.client_id.split("/", 1)) if "/" in conn.client_id else (
            conn.client_id, "")
        if self.twin == "fail":
            status, version = self.twin_status, None
        else:
            status, version = self.twins.patch(identity, payload)
            self._record(lambda: None)  # wake wait_for()
        if RESPONSES not in subscribed:
            return  # IoT Hub, too, publishes the answer to the subscription only
        data = answer_topic(topic, status, version).encode()
        data = struct.pack("!H", len(data)) + data
        stream.write(bytes([0x30]) + _length(len(data)) + data)  # QoS 0, empty payload


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
