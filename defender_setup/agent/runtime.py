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
  and exit 0, in every state (before ``READY=1`` too: the main thread never blocks on the
  network, it only waits on a pipe that signals and connectors write to); ``SIGHUP`` re-reads
  and re-validates the files and restarts the connector with them (an invalid set on reload
  is logged and the running identity is kept, like nginx does, so a bad edit never takes a
  healthy agent down; ``defender-setup restart`` is what proves a new set).

The connector seam (the IoT Hub connection plugs in here)
----------------------------------------------------------
A connector is any object with::

    start(creds: credentials.Validated, notify: Notifier) -> None
    stop() -> None
    ready_timeout: float      # optional: wait up to this long for notify.ready()

``start`` is called once the credentials are valid. It must return promptly, doing its network
work in its own thread(s). Without ``ready_timeout``, ``READY=1`` is sent as soon as ``start``
returns. With it, ``READY=1`` means "the first connection attempt has an outcome": it is sent
when the connector calls ``notify.ready()``, or after ``ready_timeout`` (+ 0.5) s at the latest.
The connector reports through ``notify`` (thread-safe, callable from any thread):

- ``notify.status(text)``: the unit's ``STATUS=`` (e.g. ``connected``, ``retrying: DNS …``);
  before ``READY=1`` the last text given is sent with it;
- ``notify.ready()``: the first attempt has an outcome;
- ``notify.log(line, level=INFO)``: one journal line (the connector must not log secrets);
- ``notify.fail(exit_code, line)``: a fatal, credential-related failure (e.g. CONNACK
  "not authorized"): the runtime logs ``line`` at error priority, calls ``stop()`` and exits
  with ``exit_code``, which makes ``defender-setup restart`` roll back. Usable before or after
  ``start`` returned.

``stop`` must return within about 1.5 s whatever the network does (it runs on SIGTERM, and the
agent must end within 2 s of it, well inside systemd's stop timeout); it is also called before
a SIGHUP reload restarts the connector with the new credentials. The default
connector (``NullConnector``) only reports the identity; it is what runs until a hub connector
is configured.

Logging goes to stderr with ``<N>`` syslog priority prefixes when systemd's journal is
attached (``JOURNAL_STREAM``), plain lines otherwise: no journal client library is loaded.
Imports are lazy (``cryptography`` only for the certificate method through ``credentials``)
and notifications are plain datagrams (:func:`systemd_notify`), to keep the resident memory
small.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from defender_setup import AGENT_DIR
from defender_setup.agent import credsdir
from defender_setup.errors import EX_CONFIG, EX_OK, SetupError, ValidationError

# syslog priorities, understood by journald in "<N>" line prefixes (SyslogLevelPrefix=yes)
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6

# Bytes written to the wake-up pipe by connectors (a fatal failure; the first outcome); signal
# numbers are written by Python's own wake-up fd mechanism and never collide with these.
_WAKE_FAIL = 0
_WAKE_READY = 255
# READY=1 waits this much beyond a connector's ready_timeout, so that a connector whose first
# attempt is bounded by that same timeout gets to report its own, more precise outcome.
READY_GRACE = 0.5


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
    """sd_notify(3): one datagram to ``$NOTIFY_SOCKET`` (``@`` names an abstract socket); a
    no-op outside systemd. Written out rather than through python-systemd, whose library
    (libsystemd and what it links) would add 0.7 MB resident for these few lines."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)


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

    def ready(self) -> None:
        self._runtime._wake(_WAKE_READY)


class NullConnector:
    """Holds no connection: the identity is valid on disk, nothing more is claimed."""

    def start(self, creds, notify: Notifier) -> None:
        notify.status(f"{identity(creds)}; credentials valid, no hub connection configured")

    def stop(self) -> None:
        pass


def identity(creds) -> str:
    """``hub/device/module (method)`` of a ``credentials.Validated``; never a secret."""
    cs = creds.connection_string
    return f"{cs.host_name}/{cs.device_id}/{cs.module_id} ({creds.method})"


def load_credentials(root: Path, credentials_dir: Path | None = None, *, isolate: bool = False):
    """Read and validate the current set. Raises SetupError (never containing a secret).

    Under systemd the files come from ``$CREDENTIALS_DIRECTORY`` (:mod:`.credsdir`), each
    one plain or decrypted by systemd from its sealed ``.cred`` form: the agent runs
    unprivileged and cannot open the agent directory. Without it (tests, ``check``, a run by
    hand as root) they are read from the agent directory under ``root``, sealed ones
    decrypted through ``systemd-creds``. The result's ``sources`` say where each file can be
    read again (the TLS client certificate and key; a decrypted one in a memory file).

    :param isolate: check a certificate in a child process (:mod:`.certcheck`): what the
        agent's own process does, so that cryptography never loads into it.
    """
    import dataclasses

    from defender_setup import credentials

    directory = credentials_dir or credsdir.directory()
    if directory is not None:
        files, sources = _from_credentials_directory(Path(directory))
        where = f"the service's credentials (loaded from /{AGENT_DIR})"
    else:
        files, sources, where = _from_agent_dir(root)
    check = None
    if isolate:
        from defender_setup.agent import certcheck

        check = certcheck.check
    validated = credentials.load(files, where, check=check)
    return dataclasses.replace(validated, sources=sources)


def _from_credentials_directory(directory: Path):
    from defender_setup.credentials import PLAIN_FILES, SEALED_NAMES

    files, sources = {}, {}
    for name in PLAIN_FILES:
        for candidate in filter(None, (name, SEALED_NAMES.get(name))):  # plain, else sealed
            try:
                data = credsdir.read(directory, candidate)
            except (OSError, ValueError) as err:
                reason = err.strerror if isinstance(err, OSError) else str(err)
                raise SetupError(f"cannot read the credential {candidate}: {reason}") from None
            if data is not None:
                files[name], sources[name] = data, directory / candidate
                break
    return files, sources


def _from_agent_dir(root: Path):
    """Without systemd (a run by hand as root, tests): the agent directory read the way
    systemd hands it over, plain files by the same names. A sealed file only systemd opens
    for the agent (the agent stays out of storage and sealing: it reads a credential set,
    it does not manage one)."""
    from defender_setup.credentials import SEALED_NAMES

    directory = Path(root) / AGENT_DIR
    sealed = [name for name in SEALED_NAMES.values() if (directory / name).exists()]
    if sealed:
        raise SetupError(f"{', '.join(sealed)} in {directory} is sealed: only systemd "
                         "decrypts it for the agent; start it with 'systemctl start "
                         "defender-iot-micro-agent'")
    files, sources = _from_credentials_directory(directory)
    return files, sources, str(directory)


def _describe(err: SetupError) -> str:
    return f"invalid credentials: {err}" if isinstance(err, ValidationError) else str(err)


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
        clock: Callable[[], float] = time.monotonic,
    ):
        self.root = Path(root)
        self.connector = connector if connector is not None else NullConnector()
        self._sd_notify = sd_notify or systemd_notify
        self._log = log or journal_log
        self._load = loader
        self._clock = clock  # for the READY=1 deadline (tests pass one that jumps)
        self._lock = threading.Lock()
        self._status = ""
        self._ready = False
        self._failure: tuple | None = None
        self._wake_w: int | None = None
        self._ready_by: float | None = None  # monotonic time READY=1 is due at the latest
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
        self._wake(_WAKE_FAIL)

    def _wake(self, byte: int) -> None:
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, bytes([byte]))
            except OSError:  # full (the main loop is behind, and will look anyway) or closed
                pass

    def deliver(self, signum: int) -> None:
        """Serve ``signum`` as if the process had received it (the same wake-up pipe the
        signal handler writes to): tests use it instead of signalling their own process."""
        self._wake(int(signum))

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
            timeout = None
            if self._ready_by is not None:
                timeout = max(0.0, self._ready_by - self._clock())
            readable, _, _ = select.select([wake_r], [], [], timeout)
            for byte in os.read(wake_r, 64) if readable else b"":
                if byte in (signal.SIGTERM, signal.SIGINT):
                    self._sd_notify("STOPPING=1")
                    self._log("stopping", INFO)
                    self.connector.stop()
                    return EX_OK
                if byte == signal.SIGHUP:
                    self._reload()
                elif byte == _WAKE_READY:
                    self._send_ready()
            if self._failure is not None:
                return self._exit_failed()
            if self._ready_by is not None and self._clock() >= self._ready_by:
                self._send_ready()

    def _start(self) -> bool:
        """Start the connector; False if it reported a fatal failure."""
        self._log(f"starting as {identity(self.creds)}", INFO)
        wait = getattr(self.connector, "ready_timeout", None)
        self._ready_by = self._clock() + wait + READY_GRACE if wait is not None else None
        self.connector.start(self.creds, Notifier(self))
        if self._failure is not None:
            return False
        if self._ready_by is None:
            self._send_ready()
        return True

    def _send_ready(self) -> None:
        """READY=1 with the last status, once per start (a late notify.ready() is a no-op)."""
        with self._lock:
            if self._ready:
                return
            self._ready = True
            self._ready_by = None
            status = self._status or identity(self.creds)
        self._sd_notify(f"READY=1\nSTATUS={status}")
        self._log(f"ready: {status}", INFO)

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
