"""defender_setup.agent.runtime: the lifecycle, in this process.

The Runtime runs in the test's main thread (signals need it) with an injected loader and
connector, and a timer thread sends the signals. The agent as a process is in
tests/functional/test_hub_process.py.
"""

import os
import signal
import socket
import threading
import time

import pytest

from defender_setup import credentials
from defender_setup.agent.runtime import ERR, Runtime, identity
from defender_setup.errors import CONNECTION_STRING, EX_CONFIG, ValidationError
from tests.fakes import Recorder

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13

KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY="  # test-only, base64 of a dummy


def creds(device="dev-1"):
    """Real validated credentials, as the runtime's loader gives them."""
    return credentials.validate("connection-string", f"HostName=hub.example.net;DeviceId="
                                f"{device};ModuleId=DefenderIotMicroAgent;SharedAccessKey={KEY}")


class ListConnector:
    """Records starts and stops; ``signals``: per start, the signals then delivered to the
    runtime (``Runtime.deliver``: the wake-up pipe a real signal writes to), in order."""

    def __init__(self, fail_on_start=None, fail_later=None, signals=()):
        self.events = []
        self.fail_on_start, self.fail_later = fail_on_start, fail_later
        self.signals, self.runtime = list(signals), None

    def start(self, creds, notify):
        self.events.append(("start", creds.connection_string.device_id))
        for signum in self.signals.pop(0) if self.signals else ():
            self.runtime.deliver(signum)
        notify.status("connected")
        if self.fail_on_start:
            notify.fail(*self.fail_on_start)
        if self.fail_later:
            threading.Timer(0.1, notify.fail, self.fail_later).start()

    def stop(self):
        self.events.append(("stop",))


def with_signals(rt: Runtime, conn: ListConnector) -> Runtime:
    conn.runtime = rt
    return rt


def test_ready_with_identity_then_clean_exit_on_sigterm(tmp_path):
    rec, conn = Recorder(), ListConnector(signals=[[signal.SIGTERM]])
    rt = with_signals(Runtime(tmp_path, connector=conn, sd_notify=rec.notify, log=rec.log,
                              loader=lambda root: creds()), conn)
    assert rt.run() == 0
    assert rec.notified[0] == "READY=1\nSTATUS=connected"
    assert rec.notified[-1] == "STOPPING=1"


def test_invalid_credentials_exit_78_with_one_error_line(tmp_path):
    def loader(root):
        raise ValidationError(CONNECTION_STRING, "is not valid base64", part="SharedAccessKey")

    rec = Recorder()
    rt = Runtime(tmp_path, sd_notify=rec.notify, log=rec.log, loader=loader)
    assert rt.run() == EX_CONFIG
    assert rec.notified == []  # never READY
    errors = [line for level, line in rec.lines if level == ERR]
    assert errors == ["not starting: invalid credentials: SharedAccessKey: is not valid base64"]


def test_sighup_reloads_and_restarts_the_connector(tmp_path):
    devices = iter(["dev-1", "dev-2"])
    rec, conn = Recorder(), ListConnector(signals=[[signal.SIGHUP], [signal.SIGTERM]])
    rt = with_signals(Runtime(tmp_path, connector=conn, sd_notify=rec.notify, log=rec.log,
                              loader=lambda root: creds(device=next(devices))), conn)
    assert rt.run() == 0
    assert conn.events == [("start", "dev-1"), ("stop",), ("start", "dev-2"), ("stop",)]
    assert "RELOADING=1" in rec.notified
    assert rec.notified.count("READY=1\nSTATUS=connected") == 2


def test_invalid_set_on_reload_keeps_running_identity(tmp_path):
    calls = []

    def loader(root):
        calls.append(1)
        if len(calls) > 1:
            raise ValidationError(CONNECTION_STRING, "is missing", part="HostName")
        return creds()

    rec, conn = Recorder(), ListConnector(signals=[[signal.SIGHUP, signal.SIGTERM]])
    rt = with_signals(Runtime(tmp_path, connector=conn, sd_notify=rec.notify, log=rec.log,
                              loader=loader), conn)
    assert rt.run() == 0
    assert conn.events == [("start", "dev-1"), ("stop",)]
    assert any("reload: keeping hub.example.net/dev-1" in line for _, line in rec.lines)


def runtime(root, rec, conn) -> Runtime:
    """A Runtime with valid credentials, recording what it notifies and logs."""
    return Runtime(root, connector=conn, sd_notify=rec.notify, log=rec.log,
                   loader=lambda _root: creds())


def test_connector_failure_before_ready_exits_with_its_code(tmp_path):
    rec, conn = Recorder(), ListConnector(fail_on_start=(76, "hub rejected: not authorized"))
    rt = runtime(tmp_path, rec, conn)
    assert rt.run() == 76
    assert not any(s.startswith("READY=1") for s in rec.notified)
    assert (ERR, "hub rejected: not authorized") in rec.lines
    assert conn.events[-1] == ("stop",)


def test_connector_failure_after_ready_from_a_thread(tmp_path):
    rec, conn = Recorder(), ListConnector(fail_later=(76, "hub closed: not authorized"))
    rt = runtime(tmp_path, rec, conn)
    assert rt.run() == 76
    assert rec.notified[0] == "READY=1\nSTATUS=connected"
    assert conn.events[-1] == ("stop",)


class SlowConnector(ListConnector):
    """Its first attempt has no outcome yet; ``outcome`` True: it comes from a thread."""

    ready_timeout = 1.0

    def __init__(self, outcome=False):
        super().__init__()
        self.outcome = outcome

    def start(self, creds, notify):
        self.events.append(("start", creds.connection_string.device_id))
        notify.status("retrying: hub unreachable (timeout: no answer within 1 s)")
        for signum in self.signals.pop(0) if self.signals else ():
            self.runtime.deliver(signum)
        if self.outcome:
            def outcome():
                notify.status("connected")
                notify.ready()
                self.runtime.deliver(signal.SIGTERM)
            threading.Thread(target=outcome, daemon=True).start()


class Jumps:
    """A clock that moves ``step`` seconds each time it is read: the READY=1 deadline
    passes without waiting for it."""

    def __init__(self, step):
        self.now, self.step = 1000.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def slow_runtime(root, rec, conn, clock=time.monotonic) -> Runtime:
    conn.runtime = Runtime(root, connector=conn, sd_notify=rec.notify, log=rec.log,
                           loader=lambda _root: creds(), clock=clock)
    return conn.runtime


def test_ready_waits_for_the_first_outcome(tmp_path):
    rec, conn = Recorder(), SlowConnector(outcome=True)
    assert slow_runtime(tmp_path, rec, conn).run() == 0
    assert rec.notified[0] == "READY=1\nSTATUS=connected"


def test_ready_after_ready_timeout_with_the_status_left_for_it(tmp_path):
    rec, conn = Recorder(), SlowConnector()
    rt = slow_runtime(tmp_path, rec, conn, clock=Jumps(1.0))
    rec.on_notify = lambda text: rt.deliver(signal.SIGTERM)  # stop once READY=1 went out
    assert rt.run() == 0
    assert rec.notified[0] == ("READY=1\nSTATUS=retrying: hub unreachable (timeout: no answer "
                               "within 1 s)")


def test_sigterm_before_the_first_outcome_stops_at_once(tmp_path):
    # The main thread never waits on the network: a signal is served while the connector's
    # first attempt hangs.
    rec, conn = Recorder(), SlowConnector()
    conn.ready_timeout = 30.0
    conn.signals = [[signal.SIGTERM]]
    started = time.monotonic()
    assert slow_runtime(tmp_path, rec, conn).run() == 0
    assert time.monotonic() - started < 1.0
    assert not any(s.startswith("READY=1") for s in rec.notified)
    assert conn.events[-1] == ("stop",)


def test_identity_names_hub_device_module_and_method_never_the_key():
    assert identity(creds()) == "hub.example.net/dev-1/DefenderIotMicroAgent (connection-string)"


@pytest.mark.parametrize("abstract", [False, True])
def test_systemd_notify_sends_one_datagram(tmp_path, monkeypatch, abstract):
    from defender_setup.agent.runtime import systemd_notify

    name = f"@defender-setup-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        systemd_notify("READY=1\nSTATUS=connected")
        assert sock.recv(4096) == b"READY=1\nSTATUS=connected"
    monkeypatch.delenv("NOTIFY_SOCKET")
    systemd_notify("READY=1")  # outside systemd: nothing, and no error
