"""Bounded steps along the path to the hub, for ``check`` and the pre-flight probe.

Interface::

    resolve(host, port, timeout) -> list[(family, sockaddr)]     # raises PathError("DNS", …)
    first_hop(host, port, proxy, timeout) -> addresses            # the hub's, or the proxy's
    open_tcp(host, port, proxy, timeout, addresses=None) -> socket   # direct, or via the proxy
    handshake(host, port, proxy, ctx, timeout, addresses=None) -> ssl.SSLSocket  # verified
    http_date(host, port, proxy, ctx, timeout, clock, addresses=None)
        -> (sent, hub's Date, answered)
    attempt(identity, settings, timeout, clock=time.time, addresses=None) -> hubnet.Result
        # one authenticated CONNECT as the agent makes it, closed again before returning;
        # kind "accepted" (CONNACK 0), "rejected" or "unreachable"
    one_line(err) -> str; timed_out(where, seconds) -> str       # for messages (DPS's too)

Every step has a deadline: the resolver runs in a daemon thread the caller stops waiting for
(glibc's getaddrinfo has no timeout of its own and retries for up to 10 s per server), and
paho, whose own TCP connect waits 5 s, is reached only after a bounded TCP connect of ours
succeeded. A name is looked up once: ``addresses`` (what :func:`first_hop` found, for any
port) are connected to as they are, paho included, while TLS, the HTTP ``Host`` and a proxy's
``CONNECT`` still name the host. Nothing here writes a file or logs; no secret reaches a
message (a proxy is described without its user and password, the SAS token lives in memory
only), and a proxy's answer reaches one with its control characters escaped.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from email.utils import parsedate_to_datetime

from .agent import hubnet
from .agent.mqttclient import at_port
from .agent.settings import SettingsError, socks_for
from .errors import printable

MAX_HEAD = 16 * 1024  # an HTTP answer's head; a peer may flood, no more is read
PEEK = 0.5  # seconds a server has to refuse a client certificate after the TLS handshake


class PathError(Exception):
    """One step failed: ``kind`` is DNS, TCP or proxy; ``text`` one line without secrets."""

    def __init__(self, kind: str, text: str):
        super().__init__(f"{kind}: {text}")
        self.kind, self.text = kind, text


def resolve(host: str, port: int, timeout: float) -> list:
    """``getaddrinfo`` for TCP, bounded by ``timeout`` seconds."""
    box: dict = {}

    def work():
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            box["error"] = err

    worker = threading.Thread(target=work, name="resolve", daemon=True)
    worker.start()
    worker.join(max(0.0, timeout))
    if worker.is_alive():
        raise PathError("DNS", f"no answer for {host} within {timeout:.3g} s (check "
                               "/etc/resolv.conf and that its name server is reachable)")
    if "error" in box:
        err = box["error"]
        why = getattr(err, "strerror", None) or str(err)
        raise PathError("DNS", f"cannot resolve {host}: {why}")
    unique: dict = {}  # each address once, in the resolver's order
    for family, _, _, _, sockaddr in box["infos"]:
        unique.setdefault(sockaddr[0], (family, sockaddr))
    return list(unique.values())


def addresses(infos) -> str:
    """The first few addresses of :func:`resolve`'s answer, for a message."""
    shown = [sockaddr[0] for _, sockaddr in infos[:3]]
    more = f" and {len(infos) - 3} more" if len(infos) > 3 else ""
    return ", ".join(shown) + more


def first_hop(host: str, port: int, proxy, timeout: float) -> list:
    """:func:`resolve` for the first hop: ``host``, or the proxy's own name (kind "proxy")."""
    if proxy is None:
        return resolve(host, port, timeout)
    try:
        return resolve(proxy.host, proxy.port, timeout)
    except PathError as err:
        raise PathError("proxy", f"the proxy's name: {err.text}") from None


def _connect_direct(host: str, port: int, timeout: float, addresses) -> socket.socket:
    deadline = time.monotonic() + timeout
    infos = at_port(addresses or resolve(host, port, timeout), port)
    error: OSError | None = None
    for family, sockaddr in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(left)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            error = err
    where = f"{host}:{port}"
    if error is None or isinstance(error, (socket.timeout, TimeoutError)):
        raise PathError("TCP", timed_out(where, timeout))
    if isinstance(error, ConnectionRefusedError):
        raise PathError("TCP", f"connection refused by {where}")
    raise PathError("TCP", f"{where}: {error.strerror or error}")


def open_tcp(host: str, port: int, proxy, timeout: float, addresses=None) -> socket.socket:
    """A connected TCP socket to ``host:port``, through ``proxy`` (settings.Proxy) if given.

    Through an HTTP proxy this is a ``CONNECT`` (the proxy resolves ``host``); the proxy's own
    name is resolved here, within the same deadline, unless ``addresses`` (:func:`first_hop`)
    are given.
    """
    if proxy is None:
        return _connect_direct(host, port, timeout, addresses)
    return _through_proxy(host, port, proxy, timeout, addresses)


def _through_proxy(host: str, port: int, proxy, timeout: float, addresses) -> socket.socket:
    deadline = time.monotonic() + timeout
    try:
        socks = socks_for(proxy)
    except SettingsError as err:
        raise PathError("proxy", str(err)) from None
    infos = addresses or first_hop(host, port, proxy, timeout)
    kinds = {"http": socks.HTTP, "socks5": socks.SOCKS5, "socks4": socks.SOCKS4}
    family, sockaddr = infos[0]
    sock = socks.socksocket(family, socket.SOCK_STREAM)
    sock.set_proxy(kinds[proxy.scheme], sockaddr[0], proxy.port, rdns=True,
                   username=proxy.username, password=proxy.password)
    sock.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        sock.connect((host, port))
        return sock
    except (socks.ProxyError, OSError) as err:
        sock.close()
        raise PathError("proxy", _proxy_reason(socks, err, proxy, host, port)) from None


def _proxy_reason(socks, err, proxy, host: str, port: int) -> str:
    inner = getattr(err, "socket_err", None)
    if isinstance(err, socks.ProxyConnectionError) or not isinstance(err, socks.ProxyError):
        why = getattr(inner, "strerror", None) or str(inner or err)
        return f"cannot connect to the proxy {proxy.describe()}: {why}"
    if isinstance(inner, (socket.timeout, TimeoutError)):
        return f"no answer from the proxy {proxy.describe()} in time (timed out)"
    # PySocks wraps the proxy's answer ("407: Proxy Authentication Required") in a
    # "Socket error"; the answer is what a person can act on
    answer = inner if isinstance(inner, socks.ProxyError) else err
    text = printable(" ".join(str(answer).split()))
    return f"the proxy {proxy.describe()} refused CONNECT {host}:{port}: {text}"


def handshake(host: str, port: int, proxy, ctx: ssl.SSLContext, timeout: float,
              addresses=None) -> ssl.SSLSocket:
    """A TLS connection verified with ``ctx`` for ``host``, all within ``timeout``.

    :raises PathError: DNS, TCP or proxy; ``ssl.SSLError``/``OSError``: the handshake.
    """
    deadline = time.monotonic() + timeout
    sock = open_tcp(host, port, proxy, timeout, addresses)
    try:  # on any failure the socket is closed: the TCP one, or the TLS one that took it over
        sock = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        sock.do_handshake()
    except BaseException:
        sock.close()
        raise
    return sock


def http_date(host: str, port: int, proxy, ctx: ssl.SSLContext, timeout: float,
              clock=time.time, addresses=None) -> tuple[float, float, float]:
    """``(local time sent, the server's HTTP Date, local time answered)`` of one HEAD /.

    :raises ValueError: no Date in the answer's head; else as :func:`handshake`.
    """
    deadline = time.monotonic() + timeout
    with handshake(host, port, proxy, ctx, timeout, addresses) as tls:
        sent = clock()
        tls.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
            tls.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = tls.recv(4096)
            if not chunk:
                break
            head += chunk
        answered = clock()
    for line in head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "date":
            try:
                return sent, parsedate_to_datetime(value.strip()).timestamp(), answered
            except (TypeError, ValueError):  # Python < 3.10 raises TypeError on garbage
                raise ValueError("its HTTPS answer has no valid Date header") from None
    raise ValueError("its HTTPS answer has no Date header")


def attempt(identity, settings, timeout: float, clock=time.time,
            connection: hubnet.Link | None = None, addresses=None) -> hubnet.Result:
    """One authenticated CONNECT within about ``timeout`` seconds, then disconnect.

    A SAS token is made as the agent makes it (``sas_lifetime`` from the settings).
    ``addresses``: :func:`first_hop`'s answer, when the caller has it; ``connection``: the
    agent's own connection parameters (``hubnet.Link``: trust, client certificate, proxy).
    :raises defender_setup.errors.SetupError: CA file, client certificate or key, or
        python3-socks.
    """
    from .agent import sas

    deadline = time.monotonic() + timeout
    checked = deadline - timeout * 0.5
    connection = connection or hubnet.Link(identity, settings)
    host, port, proxy = identity.connect_host, settings.hub_port, settings.proxy
    try:
        # Ours are bounded; paho's own connect would wait 5 s, and its lookup of the name as
        # long as glibc likes: it gets the addresses found here instead.
        addresses = addresses or first_hop(host, port, proxy, timeout * 0.5)
        pre = max(0.05, checked - time.monotonic())
        if identity.cert_file is not None:
            refused = _listen_first(identity, settings, connection.ctx, pre, clock, addresses)
            if refused is not None:
                return refused
        else:
            open_tcp(host, port, proxy, pre, addresses).close()
    except PathError as err:
        return hubnet.Result("unreachable", str(err))
    token = None
    if identity.key is not None:
        token = sas.new_token(identity.resource, identity.key, settings.sas_lifetime,
                              now=clock())
    # open() waits up to its timeout for the TLS handshake and again for the CONNACK
    left = max(0.5, (deadline - time.monotonic()) / 2)
    session = connection.open(token, clock, timeout=left, addresses=addresses)
    try:
        return session.result or hubnet.Result("accepted", "CONNACK 0", "CONNACK 0, accepted")
    finally:
        session.close()


def _listen_first(identity, settings, ctx, timeout: float, clock, addresses
                  ) -> hubnet.Result | None:
    """A hub's refusal of the client certificate, heard on a connection that writes nothing.

    A TLS 1.3 server refuses a client certificate after the handshake. When the client has
    already written its CONNECT by then, the server's close turns into a reset that can
    swallow the alert: the agent retries until it hears it, a single attempt cannot. Here the
    client only listens (for :data:`PEEK` seconds), so the alert arrives intact. ``None``:
    no refusal heard (the CONNECT attempt tells the rest).
    """
    try:
        tls = handshake(identity.connect_host, settings.hub_port, settings.proxy, ctx, timeout,
                        addresses)
    except ssl.SSLError as err:   # TLS 1.2 refuses within the handshake
        return _refusal(identity, err, clock)
    except OSError:
        return None
    with tls:
        tls.settimeout(PEEK)
        try:
            tls.recv(1)
        except ssl.SSLError as err:
            return _refusal(identity, err, clock)
        except OSError:   # silence (the certificate passed), or a plain close
            pass
    return None


def _refusal(identity, err: ssl.SSLError, clock) -> hubnet.Result | None:
    alert = hubnet.CERT_ALERTS.get(err.reason or "")
    return hubnet.certificate_refused(identity, alert, clock()) if alert else None


def one_line(err) -> str:
    """``err`` in a few words for a message: an SSL error's reason, else its text."""
    if isinstance(err, ssl.SSLError) and err.reason:
        return err.reason.replace("_", " ").lower()
    text = getattr(err, "text", None) or getattr(err, "strerror", None) or str(err)
    return " ".join((str(text) or type(err).__name__).split())


def timed_out(where: str, seconds: float) -> str:
    return f"no answer from {where} within {seconds:.3g} s (timed out)"
