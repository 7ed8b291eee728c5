"""The agent as a real process (``/usr/bin/python3 -m defender_setup.agent --root DIR``).

Interface::

    configure(root, pki, port, key=KEY, extra=None)   # SAS credentials through AgentDir,
                                                      # conf.json trusting the test CA
                                                      # (tests/hubroot.py's identity)
    agent = Agent.start(root, tmp_path, **env)        # a real NOTIFY_SOCKET datagram socket
    agent.next_message(timeout) -> str | None         # one sd_notify datagram
    agent.wait_status(predicate, timeout) -> str | None   # the first STATUS= matching
    agent.rss_kib() -> int                            # VmRSS from /proc/PID/status
    agent.terminate(timeout) -> (exit code, seconds from SIGTERM to exit, stderr)
    agent.close()                                     # kills it if still running
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests import hubroot
from tests.hubroot import DEVICE, HUB, KEY, MODULE  # noqa: F401  (for the tests)

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"  # Debian's interpreter, as the unit runs it


def configure(root: Path, pki, port: int, key: str = KEY, extra=None) -> None:
    hubroot.store(root, hubroot.validated(hubroot.sas_text(key=key)))
    hubroot.configure(root, pki, port=port, **(extra or {}))


class Agent:
    def __init__(self, proc: subprocess.Popen, sock: socket.socket):
        self.proc, self.sock = proc, sock
        self.messages: list[str] = []

    @classmethod
    def start(cls, root: Path, tmp_path: Path, **more_env: str) -> Agent:
        sock_path = str(tmp_path / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": sock_path, "PYTHONPATH": str(REPO),
               **more_env}
        proc = subprocess.Popen([PYTHON, "-m", "defender_setup.agent", "--root", str(root)],
                                env=env, stderr=subprocess.PIPE, text=True)
        return cls(proc, sock)

    def next_message(self, timeout: float = 15.0) -> str | None:
        """The next datagram; None after ``timeout`` or once the process has ended."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, 0.2))
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                if self.proc.poll() is not None:
                    return None
                continue
            self.messages.append(message)
            return message

    def wait_status(self, predicate, timeout: float = 15.0) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next_message(deadline - time.monotonic())
            if message is None:
                return None
            for line in message.splitlines():
                if line.startswith("STATUS=") and predicate(line[len("STATUS="):]):
                    return line[len("STATUS="):]

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def terminate(self, timeout: float = 15.0):
        """SIGTERM; returns (exit code, seconds until the process was gone, stderr)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - started
        self.close()
        return self.proc.returncode, took, self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()
