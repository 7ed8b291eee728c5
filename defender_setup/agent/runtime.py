"""The agent runtime: what ``defender-iot-micro-agent.service`` runs.

Interface::

    Runtime(root=Path("/"), *, connector=None, sd_notify=None, log=None).run() -> int exit code

``run()`` loads the credential set (``AgentDir(root).current()``), validates it with
``credentials.validate`` and then:

- invalid or missing credentials: one journal line (field and fix, never the secret, no
  traceback) and exit 78 (EX_CONFIG; the unit has ``RestartPreventExitStatus=78`` so systemd
  does not crash-loop on a configuration error);
- otherwise it starts the connector, sends ``READY=1`` with a ``STATUS=`` naming the identity
  (hub/device/module, method) and waits for signals: ``SIGTERM``/``SIGINT`` stop the connector
  and exit 0; ``SIGHUP`` re-reads and re-validates the files and restarts the connector with
  them (an invalid set on reload is logged and the running identity is kept, like nginx does,
  so a bad edit never takes a healthy agent down; ``defender-setup restart`` is what proves a
  new set).

The connector seam (the IoT Hub connection plugs in here)
----------------------------------------------------------
A connector is any object with::

    start(creds: credentials.Validated, notify: Notifier) -> None
    stop() -> None

``start`` is called once the credentials are valid, before ``READY=1``. It may block for a
short, bounded time so that ``READY=1`` means "the first connection attempt has an outcome";
it should do its network work in its own thread(s) and return. It reports through ``notify``
(thread-safe, callable from any thread):

- ``notify.status(text)``: the unit's ``STATUS=`` (e.g. ``connected``, ``retrying: DNS …``);
  before ``READY=1`` the last text given is sent with it;
- ``notify.log(line, level=INFO)``: one journal line (the connector must not log secrets);
- ``notify.fail(exit_code, line)``: a fatal, credential-related failure (e.g. CONNACK
  "not authorized"): the runtime logs ``line`` at error priority, calls ``stop()`` and exits
  with ``exit_code``, which makes ``defender-setup restart`` roll back. Usable before or after
  ``start`` returned.

``stop`` must return promptly (it runs on SIGTERM within systemd's stop timeout) and is also
called before a SIGHUP reload restarts the connector with the new credentials. The default
connector (``NullConnector``) only reports the identity; it is what runs until a hub connector
is configured.

Logging goes to stderr with ``<N>`` syslog priority prefixes when systemd's journal is
attached (``JOURNAL_STREAM``), plain lines otherwise: no journal client library is loaded.
Imports are lazy (``systemd.daemon`` at the first notification, ``cryptography`` only for the
certificate method through ``credentials``) to keep the resident memory small.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from defender_setup import DEFAULT_MODULE_ID
from defender_setup.errors import EX_CONFIG, EX_OK, SetupError, ValidationError

# syslog priorities, understood by journald in "<N>" line prefixes (SyslogLevelPrefix=yes)
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6

# Byte written to the wake-up pipe when a connector reports a fatal failure; signal numbers
# are written by Python's own wake-up fd mechanism and never collide with 0.
_WAKE_FAIL = 0

CONNECTION_STRING = "connection_string.txt"
CERTIFICATE = "certificate_public.pem"
PRIVATE_KEY = "certificate_private.pem"


def journal_log(line: str, level: int = INFO) -> None:
    """Write one log line; journald turns the ``<N>`` prefix into the entry's priority."""
    text = " ".join(str(line).splitlines())  # one event, one journal entry
    prefix = f"<{level}>" if os.environ.get("JOURNAL_STREAM") else ""
    try:
        sys.stderr.write(f"{prefix}{text}\n")
        sys.stderr.flush()
    except OSError:  # the journal went away (shutdown): nothing better to do
        pass


def systemd_notify(state: str) -> None:
    """sd_notify through python-systemd; a no-op outside systemd (no NOTIFY_SOCKET)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon  # lazy: only under systemd

    daemon.notify(state)


class Notifier:
    """What a connector reports through; thread-safe."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    def status(self, text: str) -> None:
        self._runtime._set_status(text)

    def log(self, line: str, level: int = INFO) -> None:
        self._runtime._log(line, level)

    def fail(self, exit_code: int, line: str) -> None:
        self._runtime._fail(exit_code, line)


class NullConnector:
    """Holds no connection: the identity is valid on disk, nothing more is claimed."""

    def start(self, creds, notify: Notifier) -> None:
        notify.status(f"{identity(creds)}; credentials valid, no hub connection configured")

    def stop(self) -> None:
        pass


def identity(creds) -> str:
    """``hub/device/module (method)`` of a ``credentials.Validated``; never a secret."""
    cs = creds.connection_string
    module = cs.module_id or DEFAULT_MODULE_ID
    return f"{cs.host_name}/{cs.device_id}/{module} ({creds.method})"


def load_credentials(root: Path):
    """Read and validate the current set. Raises SetupError (never containing a secret)."""
    from defender_setup import credentials
    from defender_setup.agentdir import AgentDir

    agentdir = AgentDir(root)
    files = {name: _content(value) for name, value in agentdir.current().items()}
    method = agentdir.method()
    if method is None or CONNECTION_STRING not in files:
        raise SetupError(
            f"not configured: no {CONNECTION_STRING} in {agentdir.path}; configure with "
            "'dpkg-reconfigure defender-setup' or 'defender-setup apply'"
        )
    return credentials.validate(
        method, files[CONNECTION_STRING], files.get(CERTIFICATE), files.get(PRIVATE_KEY)
    )


def _describe(err: SetupError) -> str:
    return f"invalid credentials: {err}" if isinstance(err, ValidationError) else str(err)


def _content(value) -> bytes:
    # AgentDir.current() maps names to bytes; accept (bytes, mode) pairs as .write() takes.
    return value[0] if isinstance(value, tuple) else value


class Runtime:
    """One agent process: load, validate, connect, serve signals. See the module docstring."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        connector=None,
        sd_notify: Callable[[str], None] | None = None,
        log: Callable[[str, int], None] | None = None,
        loader: Callable = load_credentials,
    ):
        self.root = Path(root)
        self.connector = connector if connector is not None else NullConnector()
        self._sd_notify = sd_notify or systemd_notify
        self._log = log or journal_log
        self._load = loader
        self._lock = threading.Lock()
        self._status = ""
        self._ready = False
        self._failure: tuple | None = None
        self._wake_w: int | None = None
        self.creds = None

    # -- reporting (any thread) -------------------------------------------------------------
    def _set_status(self, text: str) -> None:
        with self._lock:
            self._status = text
            ready = self._ready
        if ready:
            self._sd_notify(f"STATUS={text}")

    def _fail(self, exit_code: int, line: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = (int(exit_code), line)
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, bytes([_WAKE_FAIL]))
            except OSError:
                pass

    # -- main thread ------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM; return the process exit code."""
        wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # A Python-level handler is needed for the wake-up fd to receive the signal.
            previous[signum] = signal.signal(signum, lambda *_: None)
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            return self._serve(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_r)
            os.close(self._wake_w)
            self._wake_w = None

    def _serve(self, wake_r: int) -> int:
        try:
            self.creds = self._load(self.root)
        except SetupError as err:
            self._log(f"not starting: {_describe(err)}", ERR)
            return EX_CONFIG
        if not self._start():
            return self._exit_failed()
        while True:
            for byte in os.read(wake_r, 64):
                if byte in (signal.SIGTERM, signal.SIGINT):
                    self._sd_notify("STOPPING=1")
                    self._log("stopping", INFO)
                    self.connector.stop()
                    return EX_OK
                if byte == signal.SIGHUP:
                    self._reload()
            if self._failure is not None:
                return self._exit_failed()

    def _start(self) -> bool:
        """Start the connector; False if it reported a fatal failure."""
        self._log(f"starting as {identity(self.creds)}", INFO)
        self.connector.start(self.creds, Notifier(self))
        if self._failure is not None:
            return False
        with self._lock:
            self._ready = True
            status = self._status or identity(self.creds)
        self._sd_notify(f"READY=1\nSTATUS={status}")
        self._log(f"ready: {status}", INFO)
        return True

    def _reload(self) -> None:
        self._sd_notify("RELOADING=1")
        try:
            creds = self._load(self.root)
        except SetupError as err:
            self._log(f"reload: keeping {identity(self.creds)}: {_describe(err)}", ERR)
            self._sd_notify("READY=1")
            return
        self._log("reload: credentials re-read", INFO)
        self.connector.stop()
        with self._lock:
            self._ready = False
        self.creds = creds
        self._start()  # a failure is picked up by the main loop right after

    def _exit_failed(self) -> int:
        exit_code, line = self._failure
        if line:
            self._log(line, ERR)
        self.connector.stop()
        return exit_code
