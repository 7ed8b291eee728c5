"""A name server on loopback that answers one lookup of a name, then goes silent; and a way to
run a program with it as the only name server (a private mount namespace: root only).

Interface::

    with OnceNameServer({"testhub.azure-devices.net": "127.0.0.1"}) as ns:
        ns.address        # "127.53.x.y" (UDP port 53)
        ns.queries        # [(name, qtype)] every query received, answered or not
        ns.answered       # [(name, qtype)] the ones answered
    run_resolving_with(ns.address, argv, tmp_path, **subprocess_run_kwargs)

One lookup is one query per type (glibc's getaddrinfo asks A and AAAA); each (name, type) is
answered the first time only, every later query is read and dropped, as by a name server that
stopped answering. A and AAAA of an unknown name, and AAAA of a known one, get an empty answer.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading

A, AAAA = 1, 28


class OnceNameServer:
    def __init__(self, names: dict):
        self.names = {name.lower(): ip for name, ip in names.items()}
        self.queries: list[tuple[str, int]] = []
        self.answered: list[tuple[str, int]] = []
        self.address = f"127.53.{os.getpid() % 250}.10"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, 53))  # raises PermissionError without root
        self.sock.settimeout(0.1)  # a close in another thread would not wake recvfrom
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                ident, name, qtype, question = _parse(data)
            except (ValueError, struct.error, IndexError):
                continue
            self.queries.append((name, qtype))
            if (name, qtype) in self.answered:
                continue  # silent from now on for this name and type
            self.answered.append((name, qtype))
            ip = self.names.get(name) if qtype == A else None
            answer = b""
            if ip is not None:
                answer = b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 60, 4) + socket.inet_aton(ip)
            header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1 if answer else 0, 0, 0)
            try:
                self.sock.sendto(header + question + answer, peer)
            except OSError:
                return


def _parse(data: bytes):
    ident, _, qdcount = struct.unpack("!HHH", data[:6])
    if qdcount != 1:
        raise ValueError("one question expected")
    labels, at = [], 12
    while data[at]:
        labels.append(data[at + 1:at + 1 + data[at]].decode("ascii").lower())
        at += 1 + data[at]
    qtype, _ = struct.unpack("!HH", data[at + 1:at + 5])
    return ident, ".".join(labels), qtype, data[12:at + 5]


def run_resolving_with(address: str, argv: list, tmp_path, **kwargs):
    """``subprocess.run(argv)`` in a mount namespace whose /etc/resolv.conf names only
    ``address`` (glibc's defaults otherwise: 5 s per try, 2 tries)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\n")
    return subprocess.run(["unshare", "--mount", "sh", "-c",
                           f'mount --bind {resolv} /etc/resolv.conf && exec "$@"', "sh", *argv],
                          **kwargs)
