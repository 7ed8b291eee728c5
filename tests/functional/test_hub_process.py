"""The agent as a real process (``python3 -m defender_setup.agent``), against the test hub or
unconfigured: credentials written through AgentDir, conf.json with the test CA, a real
NOTIFY_SOCKET."""

import base64
import signal
import socket

import pytest

from defender_setup.agent import settings
from defender_setup.errors import EX_CONFIG
from tests.agentproc import DEVICE, HUB, KEY, MODULE, Agent, configure
from tests.hubsim.broker import Broker
from tests.hubsim.sasauth import SasAuth

pytestmark = [pytest.mark.hub, pytest.mark.allow_subprocess("python3")]


def start(root, tmp_path):
    agent = Agent.start(root, tmp_path)
    agent.sock.settimeout(15)
    return agent.proc, agent.sock


@pytest.fixture
def hub(hub_pki):
    broker = Broker(auth=SasAuth(HUB, {(DEVICE, MODULE): KEY}),
                    tls=(hub_pki.server_cert, hub_pki.server_key))
    broker.start()
    yield broker
    broker.stop()


def test_process_connects_and_reports_ready(hub_pki, hub, tmp_path):
    root = tmp_path / "root"
    configure(root, hub_pki, hub.port)
    proc, sock = start(root, tmp_path)
    try:
        msg = sock.recv(4096).decode()
        assert msg == f"READY=1\nSTATUS=connected to {HUB} as {DEVICE}/{MODULE}"
        assert hub.wait_for(lambda: hub.messages)
        # reload (systemctl reload): the credentials are re-read and the hub connection redone
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096) == b"RELOADING=1"
        assert sock.recv(4096).decode() == msg  # READY=1 with "connected to ..." again
        assert hub.wait_for(lambda: len(hub.accepted()) == 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        sock.close()
    assert proc.returncode == 0
    assert KEY not in err and "Traceback" not in err and "SharedAccessSignature" not in err
    assert f"connected to {HUB} as {DEVICE}/{MODULE} via localhost:{hub.port} (mqtt)" in err


def test_process_rejected_exits_76_with_one_error_line(hub_pki, hub, tmp_path):
    root = tmp_path / "root"
    wrong = base64.b64encode(b"wrong-key-0123456789abcdef0123456").decode()
    configure(root, hub_pki, hub.port, key=wrong)
    proc, sock = start(root, tmp_path)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        sock.close()
    assert proc.returncode == 76
    errors = [line for line in err.splitlines() if line.startswith("hub rejected")]
    assert len(errors) == 1, err
    assert "not authorized (CONNACK 5)" in errors[0] and "wrong SharedAccessKey" in errors[0]
    assert wrong not in err and "Traceback" not in err


def test_process_broken_conf_json_exits_78(hub_pki, hub, tmp_path):
    root = tmp_path / "root"
    configure(root, hub_pki, hub.port)
    (root / settings.CONF_PATH).write_text('{"transport": "carrier-pigeon"}')
    proc, sock = start(root, tmp_path)
    _, err = proc.communicate(timeout=20)
    sock.close()
    assert proc.returncode == 78
    assert 'transport: must be "mqtt" or "websocket", got "carrier-pigeon"' in err
    assert "Traceback" not in err


@pytest.mark.parametrize("text,key", [
    ('{"proxy": ' + ("[" * 5000 + "]" * 5000) + '}', "proxy: "),
    ('{"port": ' + ("7" * 5000) + '}', "port: "),
    ('{"proxy": "http://[::1:8080"}', "proxy: "),
    ('{"ca_file": "/etc/hub\\u0000ca.pem"}', "ca_file: "),
    ('{"proxy": "' + ("x" * 70000) + '"}', "larger than 64 KiB"),
], ids=["deep", "5000-digits", "unclosed-ipv6-proxy", "nul-in-ca-file", "70-kb"])
def test_process_hostile_conf_json_exits_78_in_one_line(hub_pki, tmp_path, text, key):
    root = tmp_path / "root"
    configure(root, hub_pki, 8883)
    (root / settings.CONF_PATH).write_text(text)
    proc, sock = start(root, tmp_path)
    _, err = proc.communicate(timeout=20)
    sock.close()
    errors = [line for line in err.splitlines() if line.startswith("not starting: ")]
    assert proc.returncode == 78, err
    assert len(errors) == 1 and key in errors[0] and len(errors[0]) < 400, err


def test_process_unreachable_stays_up_and_says_why(hub_pki, tmp_path):
    from tests.hubsim.mosquitto import free_port

    root = tmp_path / "root"
    port = free_port()
    configure(root, hub_pki, port)
    proc, sock = start(root, tmp_path)
    try:
        msg = sock.recv(4096).decode()
        assert msg == (f"READY=1\nSTATUS=retrying: hub unreachable (TCP: connection refused by "
                       f"localhost:{port})")
        # Staying up shows as trying again: the hub's port now takes TCP, and the agent's
        # next attempt arrives there (then fails at TLS: it goes on retrying).
        with socket.create_server(("127.0.0.1", port)) as listener:
            listener.settimeout(15)
            try:
                listener.accept()[0].close()
            except socket.timeout:
                pytest.fail(f"no second attempt within 15 s (exit code {proc.poll()})")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        sock.close()
    assert proc.returncode == 0 and "Traceback" not in err


def test_process_unconfigured_exits_78_in_one_line(tmp_path):
    root = tmp_path / "root"
    agent = Agent.start(root, tmp_path)
    try:
        code, err = agent.proc.wait(10), agent.proc.stderr.read()
    finally:
        agent.close()
    assert code == EX_CONFIG
    assert err == (f"not starting: not configured: no connection_string.txt in {root}/"
                   "var/defender_iot_micro_agent; configure with 'dpkg-reconfigure "
                   "defender-setup' or 'defender-setup apply'\n")
