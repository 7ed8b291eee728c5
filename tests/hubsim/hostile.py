"""A hub that misbehaves on purpose, to prove the agent stays up, bounded and stoppable.

Interface::

    hub = HostileHub(mode, tls=(cert_file, key_file))   # tls=None: plain TCP (a stalling proxy)
    port = hub.start()          # 127.0.0.1 only
    hub.connections             # TCP connections accepted so far
    hub.sent                    # bytes written to the agent so far (all connections)
    hub.stalled                 # times the agent got to the stalled step and now waits on us
    hub.wait_for(predicate, timeout) -> bool
    hub.stop()

Modes (each is one way a broken hub or a middlebox in front of it can behave):

=================== ======================================================================
``malformed``       answers CONNECT with ``30 01 00``: a PUBLISH too short for its topic
``random``          answers CONNECT with 64 random bytes (seeded per connection)
``random-after``    accepts (CONNACK 0), then sends 64 random bytes (seeded per connection)
``garbage-connack`` answers CONNECT with a CONNACK whose flags and code are garbage
``bad-after``       accepts (CONNACK 0), then sends ``30 01 00``
``huge``            answers CONNECT with a PUBLISH header announcing 256 MiB, then streams
                    zeros as fast as the agent reads them
``qos2``            accepts, then sends QoS 2 PUBLISHes with ever new packet ids
``flood``           accepts, then sends QoS 1 PUBLISHes as fast as it can and never reads
                    (with a small receive window, so the PUBACKs it asks for pile up)
``stall-accept``    never accepts TCP: its listen backlog is kept full, so SYNs are dropped
``stall-tls``       accepts TCP, never answers the TLS ClientHello (with ``tls=None``: a
                    proxy that never answers)
``stall-ws``        completes TLS, never answers the WebSocket upgrade request
``stall-connack``   completes TLS, reads CONNECT, never answers
``stall-after``     accepts (CONNACK 0), then never reads or answers again
=================== ======================================================================

Blocking sockets and one thread per connection: a stall is simply a thread that waits. A
stall counts in ``stalled`` once the agent has sent what the step answers (its ClientHello, its
upgrade request, its CONNECT, its first packet after CONNACK), so a test can act while the
agent waits, not before it got there; for ``stall-accept``, once its SYN is outstanding.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading

from tests.hubsim.broker import wait_until

MODES = ("malformed", "random", "random-after", "garbage-connack", "bad-after", "huge", "qos2",
         "flood", "stall-accept", "stall-tls", "stall-ws", "stall-connack", "stall-after")
HUGE = 256 * 1024 * 1024
CONNACK_OK = b"\x20\x02\x00\x00"
MALFORMED = b"\x30\x01\x00"  # a PUBLISH of one byte: too short for its topic's length
# what a mode answers CONNECT with, or sends after CONNACK 0, for connection number N
INSTEAD_OF_CONNACK = {"malformed": lambda n: MALFORMED,
                      "random": lambda n: random.Random(n).randbytes(64),
                      "garbage-connack": lambda n: b"\x20\x02\xff\xfe"}
AFTER_CONNACK = {"bad-after": lambda n: MALFORMED,
                 "random-after": lambda n: random.Random(n).randbytes(64)}


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a remaining length."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int = 0, mid: int = 1) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    body += payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


class HostileHub:
    def __init__(self, mode: str, tls=None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.mode, self.tls = mode, tls
        self.connections = 0
        self.sent = 0
        self._stalled = 0
        self.port = None
        self._fillers: set[int] = set()  # local ports of our own connections (stall-accept)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = None
        self._ctx = None
        if tls:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(*tls)

    # -- control (test thread) --------------------------------------------------------------
    def start(self) -> int:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        if self.mode == "stall-accept":
            self._listener.listen(0)
            for _ in range(3):  # fill the backlog: the kernel then drops further SYNs
                sock = socket.socket()
                sock.setblocking(False)
                try:
                    sock.connect(("127.0.0.1", self.port))
                except BlockingIOError:
                    pass
                self._socks.append(sock)
                self._fillers.add(sock.getsockname()[1])
        else:
            if self.mode == "flood":  # a small window: what the agent answers piles up soon
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self._listener.listen(16)
            threading.Thread(target=self._accept, daemon=True).start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        for sock in [self._listener, *self._socks]:
            try:
                sock.close()
            except OSError:
                pass

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        return wait_until(self._cond, predicate, timeout)

    @property
    def stalled(self) -> int:
        if self.mode == "stall-accept":  # nothing is accepted: the kernel's view
            return self._syns_waiting()
        return self._stalled

    def _syns_waiting(self) -> int:
        """Connections to our port in SYN_SENT (state 02 in /proc/net/tcp) but our own."""
        ours = f"0100007F:{self.port:04X}"
        count = 0
        with open("/proc/net/tcp", encoding="ascii") as handle:
            for line in handle.readlines()[1:]:
                local, remote, state = line.split()[1:4]
                if remote == ours and state == "02" \
                        and int(local.rpartition(":")[2], 16) not in self._fillers:
                    count += 1
        return count

    # -- server threads ---------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(sock)
            with self._cond:
                self.connections += 1
                number = self.connections
                self._cond.notify_all()
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            if self._ctx is not None and self.mode not in ("stall-tls",):
                sock = self._ctx.wrap_socket(sock, server_side=True)
                self._socks.append(sock)
            self._session(sock, number)
        except (OSError, ValueError):
            pass  # the agent hung up: that is its right
        finally:
            if not self.mode.startswith("stall"):
                sock.close()  # said what it had to say (a stall holds until stop())

    def _send(self, sock, data: bytes) -> None:
        sock.sendall(data)
        with self._cond:
            self.sent += len(data)
            self._cond.notify_all()

    def _hold(self, sock=None) -> None:
        """Never answer again; counted as stalled once ``sock`` (if given) has a byte from
        the agent: what it sent that the step would answer."""
        if sock is not None and not sock.recv(1):
            return  # the agent hung up first
        with self._cond:
            self._stalled += 1
            self._cond.notify_all()
        self._stop.wait()

    def _session(self, sock, number: int) -> None:
        mode = self.mode
        if mode in ("stall-tls", "stall-ws") or self._ctx is None:
            return self._hold(sock)  # the ClientHello, the upgrade request, a proxy's CONNECT
        self._read_packet(sock)  # CONNECT
        if mode == "stall-connack":
            return self._hold()
        if mode in INSTEAD_OF_CONNACK:
            return self._send(sock, INSTEAD_OF_CONNACK[mode](number))
        if mode == "huge":
            self._send(sock, b"\x30" + remaining_length(HUGE - 1) + b"\x00\x05topic")
            chunk = bytes(64 * 1024)
            while not self._stop.is_set():
                self._send(sock, chunk)
            return None
        self._send(sock, CONNACK_OK)
        if mode in AFTER_CONNACK:
            return self._send(sock, AFTER_CONNACK[mode](number))
        if mode == "stall-after":
            return self._hold(sock)  # the agent's first packet after CONNACK
        if mode == "qos2":
            for mid in range(1, 65536):
                if self._stop.is_set():
                    break
                self._send(sock, publish(b"devices/x/messages/devicebound/", bytes(512), 2, mid))
            return None
        if mode == "flood":  # small QoS 1 PUBLISHes, each asking for a PUBACK
            burst = publish(b"d", b"", 1) * 512
            while not self._stop.is_set():
                self._send(sock, burst)
        return None

    @staticmethod
    def _read_packet(sock) -> bytes:
        first = sock.recv(1)
        if not first:
            raise ConnectionError("closed")
        length, mult = 0, 1
        for _ in range(4):
            byte = sock.recv(1)
            if not byte:
                raise ConnectionError("closed")
            length += (byte[0] & 0x7F) * mult
            mult *= 128
            if not byte[0] & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                raise ConnectionError("closed")
            body += chunk
        return first + body
