"""A small threaded HTTPS/JSON server on loopback, the base of the DPS and hub REST stand-ins.

Interface::

    server = JsonServer(handle, tls=(cert, key), client_ca=None, host="127.0.0.1")
    port = server.start(port=0)
    server.requests          # [Req(method, path, query, headers, body, peer_cn)]
    server.stall = True      # accept and finish TLS, then never answer (a stalled peer)
    server.trickle = True    # ... or answer one byte every 0.1 s, never ending a line
    server.stop()

``handle(req) -> (status, body dict, headers dict)``. The TLS handshake happens in the
connection's own thread (a stalled client stalls nobody else); with ``client_ca`` a client
certificate is asked for and verified (optional: SAS clients send none), and its CN is
``req.peer_cn``.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class Req:
    method: str
    path: str
    query: dict
    headers: dict
    body: dict = field(default_factory=dict)
    peer_cn: str | None = None


def _cn(cert: dict | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubsim"

    def setup(self):
        owner = self.server.owner
        self.request.settimeout(30)
        try:
            self.request = owner.ctx.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            self.request.close()
            raise
        super().setup()

    def log_message(self, *args):  # quiet: the requests list says what happened
        pass

    def _serve(self):
        owner = self.server.owner
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 1 << 20)) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        req = Req(self.command, urllib.parse.unquote(url.path),
                  dict(urllib.parse.parse_qsl(url.query)),
                  {k.lower(): v for k, v in self.headers.items()},
                  body if isinstance(body, dict) else {},
                  _cn(self.request.getpeercert()))
        with owner.lock:
            owner.requests.append(req)
        if owner.stall:
            owner.stopped.wait(3600)
            return
        if owner.trickle:
            while not owner.stopped.wait(0.1):
                self.wfile.write(b"H")
                self.wfile.flush()
            return
        status, answer, headers = owner.handle(req)
        data = json.dumps(answer).encode() if answer is not None else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = _serve


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client that hangs up mid-handshake (check's TLS test does) is not news
        self.owner.errors += 1


class JsonServer:
    def __init__(self, handle, tls, client_ca=None, host: str = "127.0.0.1"):
        self.handle, self.host = handle, host
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*(str(part) for part in tls))
        if client_ca:
            self.ctx.load_verify_locations(cafile=str(client_ca))
            self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.requests: list[Req] = []
        self.lock = threading.Lock()
        self.stall = self.trickle = False
        self.errors = 0  # connections that ended in an exception (a handshake cut short)
        self.stopped = threading.Event()
        self.httpd = None
        self.port = None

    def start(self, port: int = 0) -> int:
        self.httpd = _Server((self.host, port), _Handler)
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self.port

    def stop(self) -> None:
        self.stopped.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


class SilentPort:
    """A listening TCP socket that never accepts: connects succeed (the kernel completes
    them), the TLS handshake never does. ``with SilentPort() as port: ...``"""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def __enter__(self) -> int:
        return self.port

    def __exit__(self, *exc) -> None:
        self.sock.close()


class Served:
    """A stand-in answered by its :class:`JsonServer` (``self.server``): started and stopped
    through it."""

    server: JsonServer

    def start(self, port: int = 0) -> int:
        return self.server.start(port)

    def stop(self) -> None:
        self.server.stop()
