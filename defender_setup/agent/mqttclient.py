"""paho-mqtt, bounded: the client the hub connection drives, and what a hub must not do to it.

Interface (used by :mod:`defender_setup.agent.hubnet`)::

    mqtt = load_paho()                   # paho.mqtt.client (SetupError when not installed)
    Client = client_class(mqtt)          # paho's Client with the bounds below
    client.attempt = (proxy, deadline, aborter, addresses)   # set before connect()
    client.raw_connack                   # the CONNACK return code as sent, None before one
    client.protocol_error                # (reason, detail) once the hub broke the protocol
    client.backlog()                     # packets queued by paho and not yet written
    ctx = TlsContext(ssl.PROTOCOL_TLS_CLIENT); ctx.begin(deadline)   # per attempt
    ctx.last_error, ctx.phase            # "tcp", "tls" (handshake), "upgrade" (after it)
    aborter = Aborter(); aborter.fire()  # from another thread: ends the attempt's blocking step

A hub, or whatever sits in front of it, can lie, stall or flood; the agent stays up and bounded:

- **Size**: an inbound packet announcing more than :data:`MAX_PACKET` bytes ends the connection
  before paho reads (and allocates) its body: paho would otherwise ask the socket for the whole
  announced length at once and keep every byte until the packet is complete (a PUBLISH header
  announcing 256 MB grew the agent from 23 to 221 MB). 512 KiB is twice the largest message
  IoT Hub itself sends or accepts (256 KiB), so no genuine packet comes near it.
- **Shape**: a packet paho cannot parse (its handlers trust the announced lengths and raise
  ``struct.error``/``IndexError``), a first packet that is not a CONNACK, a CONNACK with reserved
  flags, a QoS 2 PUBLISH (paho keeps each one until a PUBREL that may never come; the agent
  subscribes at QoS 0 only, to the twin's answers) all end the connection as a protocol
  error instead of an exception.
- **Flood**: :meth:`backlog` lets the caller end a connection whose peer sends faster than it
  reads (every PUBLISH it sends makes paho queue a PUBACK).
- **Time**: every blocking step of an attempt (TCP connect, the proxy's CONNECT, the TLS
  handshake, the WebSocket upgrade) ends at the attempt's deadline, and :meth:`Aborter.fire`
  ends it at once: a shutdown of the socket wakes whatever call blocks on it.

Overridden paho internals (``_create_socket_connection``, ``_sock_recv``, ``_packet_read``,
``_packet_handle``, ``_handle_connack``, ``_in_packet``, ``_out_packet``) are the same in
paho-mqtt 1.5 (Debian 11), 1.6 (Debian 12) and 2.1 (Debian 13).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time

from defender_setup.errors import SetupError

MAX_PACKET = 512 * 1024
MAX_UPGRADE_ANSWER = 16 * 1024  # the HTTP answer to the WebSocket upgrade: a few headers
CONNACK, PUBLISH = 0x20, 0x30
PACKET_NAMES = {0x10: "CONNECT", 0x20: "CONNACK", 0x30: "PUBLISH", 0x40: "PUBACK",
                0x50: "PUBREC", 0x60: "PUBREL", 0x70: "PUBCOMP", 0x80: "SUBSCRIBE",
                0x90: "SUBACK", 0xA0: "UNSUBSCRIBE", 0xB0: "UNSUBACK", 0xC0: "PINGREQ",
                0xD0: "PINGRESP", 0xE0: "DISCONNECT"}


def packet_name(command: int) -> str:
    return PACKET_NAMES.get(command & 0xF0, f"type-{command >> 4}")


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (monotonic); socket.timeout once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


class Aborter:
    """Ends the blocking steps of connection attempts from another thread.

    The attempt's thread calls :meth:`watch` on each socket it creates; :meth:`fire` shuts that
    socket down (which wakes a blocked connect, proxy negotiation, TLS handshake or recv) and
    makes every later :meth:`watch` raise, so no new step starts. A duplicate descriptor is
    kept because ssl and paho replace the Python object around the socket; :meth:`release`
    closes it once the blocking steps are over (it would otherwise keep the connection open).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._dup: socket.socket | None = None
        self.fired = False

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._drop()
            if self.fired:
                raise ConnectionAbortedError("the agent is stopping")
            self._dup = socket.socket(fileno=os.dup(sock.fileno()))

    def release(self) -> None:
        with self._lock:
            self._drop()

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._dup is not None:
                try:
                    self._dup.shutdown(socket.SHUT_RDWR)
                except OSError:  # not connected yet, or already closed: nothing blocks on it
                    pass

    def _drop(self) -> None:
        if self._dup is not None:
            self._dup.close()
            self._dup = None


def _ascii(name: str):
    """An ASCII host name as bytes: given a str, getaddrinfo and the TLS layer encode it with
    the IDNA codec first, which loads encodings.idna, stringprep and unicodedata (0.4 MB
    resident) for nothing. Host names are ASCII (connection_string checks them); anything
    else is passed on as it is."""
    return name.encode("ascii") if name.isascii() else name


def at_port(addresses, port: int) -> list:
    """``[(family, sockaddr)]`` (as resolved for any port) with ``port`` in each sockaddr."""
    return [(family, (sockaddr[0], port, *sockaddr[2:])) for family, sockaddr in addresses]


def open_tcp(host: str, port: int, proxy, deadline: float | None, aborter: Aborter | None,
             addresses=None):
    """A TCP connection to ``host:port``, through ``proxy`` (settings.Proxy) if given.

    ``addresses`` (``[(family, sockaddr)]``): the first hop's addresses, the hub's or the
    proxy's, resolved already by a caller that bounds its lookup; no name is resolved then.
    Through a proxy the hub's name is resolved by the proxy (CONNECT host:port); only the
    proxy's own name is resolved here. Name resolution is glibc's (bounded by resolv.conf's
    timeouts) and cannot be interrupted: a stopping agent does not wait for it.
    """
    if proxy is not None:
        import socks

        kinds = {"http": socks.HTTP, "socks5": socks.SOCKS5, "socks4": socks.SOCKS4}
    aborter = aborter or Aborter()
    error: OSError | None = None
    target = (proxy.host, proxy.port) if proxy is not None else (host, port)
    if addresses is None:
        addresses = [(info[0], info[4]) for info in socket.getaddrinfo(
            _ascii(target[0]), target[1], type=socket.SOCK_STREAM)]
    for family, address in at_port(addresses, target[1]):
        new = socks.socksocket if proxy is not None else socket.socket
        sock = new(family, socket.SOCK_STREAM)
        try:
            aborter.watch(sock)
            sock.settimeout(_left(deadline))
            if proxy is not None:
                sock.set_proxy(kinds[proxy.scheme], address[0], address[1], True,
                               proxy.username, proxy.password)
                sock.connect((host, port))
            else:
                sock.connect(address)
            return sock
        except OSError as err:  # socks' errors are OSErrors too
            sock.close()
            error = err
            if aborter.fired or isinstance(err, socket.timeout):
                break
    raise error or OSError(f"no address for {target[0]}")


class TlsSocket(ssl.SSLSocket):
    """Remembers the TLS error paho swallows (a TLS 1.3 server rejects a client certificate
    only after the handshake, so its alert arrives on the first read), and bounds by the
    attempt's deadline the handshake and the WebSocket upgrade, which paho would otherwise
    wait for as long as the keep-alive (60 s), byte by byte."""

    def recv(self, buflen=1024, flags=0):
        ctx = self.context
        # during an attempt, paho reads in blocking mode only for the WebSocket upgrade
        blocking = self.gettimeout() != 0.0 and ctx.deadline is not None
        try:
            if blocking:
                self.settimeout(_left(ctx.deadline))
            data = super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except (ssl.SSLError, OSError) as err:
            ctx.last_error = err
            raise
        if blocking:
            ctx.upgrade_read += len(data)
            if ctx.upgrade_read > MAX_UPGRADE_ANSWER:
                raise ConnectionAbortedError(f"answer longer than {MAX_UPGRADE_ANSWER} bytes")
        return data

    def do_handshake(self, block=False):
        ctx = self.context
        previous = self.gettimeout()
        try:
            if ctx.deadline is not None:
                self.settimeout(_left(ctx.deadline))
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as err:
            ctx.last_error = err
            raise
        finally:
            self.settimeout(previous)
        ctx.phase = "upgrade"


class TlsContext(ssl.SSLContext):
    sslsocket_class = TlsSocket
    last_error: BaseException | None = None
    deadline: float | None = None
    phase = "tcp"
    upgrade_read = 0

    def begin(self, deadline: float | None) -> None:
        """A new attempt, to be over by ``deadline`` (time.monotonic)."""
        self.last_error, self.deadline, self.phase, self.upgrade_read = None, deadline, "tcp", 0

    def end(self) -> None:
        """The attempt's blocking steps are over: no deadline for other users of the context
        (``check`` makes TLS connections of its own with it)."""
        self.deadline = None

    def _encode_hostname(self, hostname):
        # SNI and the certificate check take the name as given: see _ascii
        if isinstance(hostname, str) and hostname.isascii():
            return hostname
        return super()._encode_hostname(hostname)

    def wrap_socket(self, *args, **kwargs):
        self.phase = "tls"  # paho wraps right after the TCP (or proxy) connect
        return super().wrap_socket(*args, **kwargs)


def load_paho():
    """Import paho without what it only needs for features the agent does not use.

    paho imports ``urllib.request`` just to read an ``mqtt_proxy`` environment variable, and
    that drags in http.client, email, bz2, lzma, tempfile...: about 3 MB resident of a 20 MB
    budget. The agent takes its proxy from conf.json only, so paho gets a two-function
    stand-in saying "bypass environment proxies", and no ``dns`` (dnspython, for connect_srv).
    Both are removed from ``sys.modules`` again, so nobody else ever sees them.
    """
    import sys
    import types

    stub = None
    if "urllib.request" not in sys.modules:
        stub = types.ModuleType("urllib.request", "paho's view: no environment proxies")
        stub.proxy_bypass = lambda host: True
        stub.getproxies = dict
        sys.modules["urllib.request"] = stub
    no_dns = "dns" not in sys.modules
    if no_dns:
        sys.modules["dns"] = None  # makes "import dns.resolver" raise ImportError
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise SetupError("python3-paho-mqtt is not installed") from None
    finally:
        if stub is not None and sys.modules.get("urllib.request") is stub:
            del sys.modules["urllib.request"]
            import urllib

            if getattr(urllib, "request", None) is stub:
                del urllib.request
        if no_dns and "dns" in sys.modules and sys.modules["dns"] is None:
            del sys.modules["dns"]
    return mqtt


_CLIENT_CLASS = None


def client_class(mqtt):
    """paho's Client with the bounds of the module docstring (made once per process)."""
    global _CLIENT_CLASS
    if _CLIENT_CLASS is None:
        _CLIENT_CLASS = _bounded_client(mqtt)
    return _CLIENT_CLASS


def _bounded_client(mqtt):
    paho_dir = os.path.dirname(os.path.abspath(mqtt.__file__))
    protocol = mqtt.MQTT_ERR_PROTOCOL

    def raised_by_paho(err: BaseException) -> bool:
        # paho parsing what it should have refused, as opposed to a bug in our callbacks
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and os.path.dirname(tb.tb_frame.f_code.co_filename) == paho_dir

    class Client(mqtt.Client):
        raw_connack = None
        protocol_error: tuple | None = None
        attempt: tuple = (None, None, None, None)

        def backlog(self) -> int:
            return len(self._out_packet)

        def refuse(self, reason: str, detail: str = ""):
            if self.protocol_error is None:
                self.protocol_error = (reason, detail)
            return protocol

        def _create_socket_connection(self):
            return open_tcp(self._host, self._port, *self.attempt)

        def _sock_recv(self, bufsize):
            packet = self._in_packet
            if packet["have_remaining"] and packet["remaining_length"] > MAX_PACKET:
                # paho is about to read the body: refuse before a byte of it is held
                self.refuse("packet too large", f"{packet_name(packet['command'])} of "
                                                 f"{packet['remaining_length']} bytes announced, "
                                                 f"limit {MAX_PACKET}")
                raise ConnectionAbortedError("packet too large")
            return super()._sock_recv(bufsize)

        def _packet_read(self):
            rc = super()._packet_read()
            if rc == protocol and self.protocol_error is None:  # more than 4 length bytes
                self.refuse(f"malformed {packet_name(self._in_packet['command'])} packet")
            return rc

        def _packet_handle(self):
            command = self._in_packet["command"]
            name = packet_name(command)
            if self.raw_connack is None and command & 0xF0 != CONNACK:
                return self.refuse(f"{name} instead of CONNACK")
            if command & 0xF0 == PUBLISH and command & 0x06 >= 0x04:
                return self.refuse(f"unexpected QoS {(command >> 1) & 3} PUBLISH",
                                    "the agent subscribes at QoS 0 only")
            try:
                rc = super()._packet_handle()
            except Exception as err:
                if not raised_by_paho(err):
                    raise
                return self.refuse(f"malformed {name} packet")
            # paho reports CONNACK 1 (with reconnect_on_failure off) as a protocol error too
            if rc == protocol and not (command & 0xF0 == CONNACK and self.raw_connack):
                self.refuse(f"malformed or unexpected {name} packet")
            return rc

        def _handle_connack(self):
            packet = self._in_packet["packet"]
            if len(packet) == 2:
                if packet[0] & 0xFE:
                    return self.refuse("malformed CONNACK packet", "reserved flags set")
                # paho 2 maps every code above 5 to 128, and paho 1 reports code 1 as a bare
                # protocol error without calling on_connect: keep the code as the hub sent it
                self.raw_connack = packet[1]
            return super()._handle_connack()

    return Client
