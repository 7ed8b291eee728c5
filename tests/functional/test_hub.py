"""defender_setup.agent.hub against real brokers on loopback (tests/hubsim): the SAS path.

No mock of paho, of TLS or of the network: a Python MQTT broker that verifies the token's
signature, resource and expiry against the device key, reached over real TLS sockets. The
runtime side of the seam (``notify``) is a recorder, since the runtime is not under test here.
"""

import base64
import importlib.util
import json
import time

import pytest

from defender_setup.agent import hub, settings
from tests.fakes import Notify
from tests.hubsim.broker import Broker
from tests.hubsim.pki import Pki
from tests.hubsim.sasauth import SasAuth

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13

KEY = base64.b64encode(b"k" * 32).decode()
WRONG_KEY = base64.b64encode(b"w" * 32).decode()
DEVICE, MODULE = "dev-1", "DefenderIotMicroAgent"


def identity(key=KEY, host="localhost", gateway=None, module=MODULE):
    return hub.Identity(host, DEVICE, module, gateway, key)


def conf(hub_pki, **kw):
    return settings.Settings(ca_file=hub_pki.ca_file, **kw)


def sas_hub(hub_pki, hub_name="localhost", clock=time.time, **kw):
    auth = SasAuth(hub_name, {(DEVICE, MODULE): KEY}, clock=clock)
    broker = Broker(auth=auth, tls=(hub_pki.server_cert, hub_pki.server_key), **kw)
    broker.start()
    return broker, auth


def started(connector, ident) -> Notify:
    """``connector.start``, then wait as the runtime does: READY=1 is sent once the first
    attempt has an outcome (``notify.ready()``), or after ``ready_timeout`` at the latest with
    the status the connector left for that case."""
    notify = Notify()
    connector.start(ident, notify)
    notify.wait(lambda: notify.readied or notify.failed, connector.ready_timeout + 1)
    return notify


@pytest.fixture
def run():
    """Start connectors and always stop them (and their brokers) at the end."""
    running = []

    def start(ident, conf, broker=None, **kw):
        kw.setdefault("ready_timeout", 5.0)
        kw.setdefault("backoff", (0.1, 0.5))
        connector = hub.HubConnector(settings=conf, **kw)
        running.append((connector, broker))
        return connector, started(connector, ident)

    yield start
    for connector, broker in running:
        connector.stop()
        if broker is not None:
            broker.stop()


def test_accepted_sas_connects_reports_and_sends_heartbeat(hub_pki, run):
    broker, auth = sas_hub(hub_pki)
    c, n = run(identity(), conf(hub_pki, port=broker.port), broker)
    # start() returned: the first attempt has an outcome
    assert n.statuses[-1] == f"connected to localhost as {DEVICE}/{MODULE}"
    assert c.state == "connected"
    conn = broker.accepted()[0]
    assert conn.client_id == f"{DEVICE}/{MODULE}"
    assert conn.username == f"localhost/{DEVICE}/{MODULE}/?api-version=2021-04-12"
    assert conn.sni == "localhost"
    assert broker.wait_for(lambda: broker.messages)
    client_id, topic, payload = broker.messages[0]
    assert topic.startswith(f"devices/{DEVICE}/modules/{MODULE}/messages/events/")
    beat = json.loads(payload)
    assert beat["type"] == "heartbeat" and beat["agentVersion"] and "osRelease" in beat
    assert KEY not in n.everything()


def test_wrong_key_is_a_rejection_with_cause_and_exit_code(hub_pki, run):
    broker, auth = sas_hub(hub_pki)
    c, n = run(identity(key=WRONG_KEY), conf(hub_pki, port=broker.port), broker)
    assert n.failed is not None
    code, line = n.failed
    assert code == hub.EX_REJECTED == 76
    assert "not authorized (CONNACK 5)" in line
    assert "wrong SharedAccessKey" in line and "case-sensitive" in line
    assert auth.last_reason == "signature mismatch"
    assert WRONG_KEY not in n.everything() and "\n" not in line
    assert c.state == "rejected"


def test_wrong_module_case_is_rejected_naming_ids(hub_pki, run):
    broker, auth = sas_hub(hub_pki)
    c, n = run(identity(module=MODULE.lower()), conf(hub_pki, port=broker.port), broker)
    assert n.failed[0] == 76
    assert f"ModuleId '{MODULE.lower()}'" in n.failed[1]


def test_skewed_clock_token_expired_is_rejected_with_clock_in_line(hub_pki, run):
    broker, auth = sas_hub(hub_pki)
    two_hours_ago = lambda: time.time() - 7200  # noqa: E731
    c, n = run(identity(), conf(hub_pki, port=broker.port), broker, clock=two_hours_ago)
    assert n.failed[0] == 76
    assert "clock skew" in n.failed[1] and "local time" in n.failed[1]
    assert auth.last_reason.startswith("token expired")


def test_impossible_clock_is_named_as_most_likely_cause(hub_pki, run):
    broker, auth = sas_hub(hub_pki)
    c, n = run(identity(), conf(hub_pki, port=broker.port), broker, clock=lambda: 86400.0)
    assert n.failed[0] == 76
    assert "most likely clock skew" in n.failed[1] and "1970-01-02" in n.failed[1]


def test_token_renewed_during_long_connection_without_losing_messages(hub_pki, run):
    # The hub drops a connection when its token expires (expire=True), as IoT Hub does.
    broker, auth = sas_hub(hub_pki, expire=True)
    c, n = run(identity(), conf(hub_pki, port=broker.port, sas_lifetime=5,
                                heartbeat_interval=0), broker)
    sent = []

    def produce(count):  # a steady stream, as the agent's own messages come
        for _ in range(count):
            sent.append(f"m{len(sent)}".encode())
            c.send(sent[-1])
            time.sleep(0.05)  # paces the stand-in producer; not a wait for anything

    deadline = time.monotonic() + 30
    while len(broker.accepted()) < 3:  # until the token has been renewed twice
        assert time.monotonic() < deadline, f"{len(broker.accepted())} connections in 30 s"
        produce(1)
    produce(10)  # and on past the second renewal
    assert broker.wait_for(lambda: {p for _, _, p in broker.messages} >= set(sent), 10)
    tokens = {conn.password for conn in broker.accepted()}
    assert len(broker.accepted()) >= 3 and len(tokens) == len(broker.accepted())
    # statuses[0] is what READY=1 would have carried had the first attempt timed out
    assert not any(s.startswith("retrying") for s in n.statuses[1:]), n.statuses
    assert n.failed is None


def test_broker_down_then_up_retries_then_connects(hub_pki, run):
    from tests.hubsim.mosquitto import free_port

    port = free_port()
    c, n = run(identity(), conf(hub_pki, port=port))
    assert n.statuses[-1] == ("retrying: hub unreachable (TCP: connection refused by "
                              f"localhost:{port})")
    assert c.state == "retrying" and n.failed is None
    broker, auth = sas_hub(hub_pki)
    broker.stop()  # only to get a fresh object on the known port below
    broker = Broker(auth=auth, tls=(hub_pki.server_cert, hub_pki.server_key))
    broker.start(port)
    try:
        assert n.wait(lambda: n.statuses[-1].startswith("connected to"))
    finally:
        c.stop()
        broker.stop()
    warnings = [line for level, line in n.lines if level == 4]
    assert len(warnings) == 1  # one line per distinct reason, not one per attempt


def test_gateway_host_name_tls_to_gateway_identity_on_hub(hub_pki, run):
    hub_name = "testhub.azure-devices.net"
    broker, auth = sas_hub(hub_pki, hub_name=hub_name)
    ident = identity(host=hub_name, gateway="localhost")
    c, n = run(ident, conf(hub_pki, port=broker.port), broker)
    assert c.state == "connected", n.everything()
    conn = broker.accepted()[0]
    assert conn.sni == "localhost"  # TLS (SNI, certificate check) went to the gateway
    assert conn.username.startswith(f"{hub_name}/{DEVICE}/{MODULE}/")
    assert n.statuses[-1] == f"connected to {hub_name} as {DEVICE}/{MODULE}"


def test_websocket_transport(hub_pki, run):
    broker, auth = sas_hub(hub_pki, websocket=True)
    c, n = run(identity(), conf(hub_pki, transport="websocket", port=broker.port), broker)
    assert c.state == "connected", n.everything()
    assert broker.accepted()[0].transport == "websocket"
    assert broker.wait_for(lambda: broker.messages)


def test_untrusted_hub_certificate_is_unreachable_tls_not_rejection(hub_pki, run, tmp_path):
    broker, auth = sas_hub(hub_pki)
    other = Pki(tmp_path / "other", seed=1)  # a CA that did not sign the hub's certificate
    c, n = run(identity(), settings.Settings(ca_file=other.ca_file, port=broker.port), broker)
    assert n.failed is None
    assert n.statuses[-1].startswith("retrying: hub unreachable (TLS: localhost is not trusted: ")


def test_dns_failure_is_named(hub_pki, run):
    c, n = run(identity(host="no-such-host.invalid"), conf(hub_pki, port=8883))
    assert n.statuses[-1].startswith(
        "retrying: hub unreachable (DNS: cannot resolve no-such-host.invalid")


def test_hub_closing_the_tls_handshake(hub_pki, run):
    broker = Broker(mode="drop-tls")
    broker.start()
    c, n = run(identity(), conf(hub_pki, port=broker.port), broker)
    assert n.failed is None
    assert n.statuses[-1] == (f"retrying: hub unreachable (TLS: localhost:{broker.port} closed "
                              "the connection during the TLS handshake)")


def test_broker_that_never_answers_connect(hub_pki, run):
    broker, auth = sas_hub(hub_pki, mode="silent")
    c, n = run(identity(), conf(hub_pki, port=broker.port), broker, ready_timeout=1.0)
    assert n.wait(lambda: any("no answer to CONNECT" in s for s in n.statuses), 5)
    assert n.failed is None and c.state in ("connecting", "retrying")


@pytest.mark.parametrize("code,rejected,words", [
    (1, True, "unacceptable protocol version (CONNACK 1)"),
    (2, True, "identifier rejected (CONNACK 2)"),
    (3, False, "hub unavailable (server unavailable, CONNACK 3)"),
    (4, True, "bad user name or password (CONNACK 4)"),
    (5, True, "not authorized (CONNACK 5)"),
    (6, False, "invalid CONNACK return code 6 from localhost:"),  # not MQTT 3.1.1
])
def test_every_connack_failure_code(hub_pki, run, code, rejected, words):
    broker, auth = sas_hub(hub_pki, connack=code)
    c, n = run(identity(), conf(hub_pki, port=broker.port), broker)
    if rejected:
        assert n.failed is not None and n.failed[0] == 76 and words in n.failed[1]
    else:
        assert n.failed is None and words in n.statuses[-1]
        assert n.statuses[-1].startswith("retrying: hub unreachable (MQTT: ")


@pytest.mark.parametrize("mode", ["random", "random-after"])
def test_random_bytes_from_the_hub_never_end_the_connector(hub_pki, run, mode):
    # Every connection gets other random bytes (seeded by its number): dozens of shapes of
    # garbage, before and after CONNACK. Each is a network condition, never an exception.
    from tests.hubsim.hostile import HostileHub

    hostile = HostileHub(mode, tls=(hub_pki.server_cert, hub_pki.server_key))
    hostile.start()
    try:
        c, n = run(identity(), conf(hub_pki, port=hostile.port), backoff=(0.01, 0.02),
                   ready_timeout=1.0)
        hostile.wait_for(lambda: hostile.connections >= 40 or n.failed, 30)
        assert n.failed is None, n.failed
        assert hostile.connections >= 40
        reasons = {s for s in n.statuses[1:] if not s.startswith("connected")}
        assert reasons and all(s.startswith("retrying: hub unreachable (") for s in reasons)
    finally:
        hostile.stop()


@pytest.mark.allow_subprocess("openssl")
def test_default_trust_is_the_system_ca_directory(hub_pki, run, tmp_path, monkeypatch):
    # No ca_file: the hub's CA is found through the hashed CA directory, read lazily
    # (SSL_CERT_DIR points OpenSSL's default directory at a test copy).
    import shutil
    import subprocess

    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(hub_pki.ca_file, certs / "hubsim.pem")
    subprocess.run(["openssl", "rehash", str(certs)], check=True)
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    broker, auth = sas_hub(hub_pki)
    c, n = run(identity(), settings.Settings(port=broker.port), broker)
    assert c.state == "connected", n.everything()


HAVE_SOCKS = importlib.util.find_spec("socks") is not None


def _proxy(url):
    return settings.parse(json.dumps({"proxy": url})).proxy


@pytest.mark.skipif(not HAVE_SOCKS, reason="python3-socks is not installed")
def test_through_an_http_proxy(hub_pki, run):
    from tests.hubsim.proxy import ConnectProxy

    proxy = ConnectProxy(auth=("agent", "pr0xy-pass"))
    proxy_port = proxy.start()
    try:
        broker, auth = sas_hub(hub_pki)
        url = f"http://agent:pr0xy-pass@127.0.0.1:{proxy_port}"
        c, n = run(identity(), conf(hub_pki, port=broker.port, proxy=_proxy(url)), broker)
        assert c.state == "connected", n.everything()
        assert proxy.targets == [f"localhost:{broker.port}"]  # the hub name, resolved there
        assert "pr0xy-pass" not in n.everything()
    finally:
        proxy.stop()


@pytest.mark.skipif(not HAVE_SOCKS, reason="python3-socks is not installed")
def test_proxy_down_or_refusing_is_named(hub_pki, run):
    from tests.hubsim.mosquitto import free_port
    from tests.hubsim.proxy import ConnectProxy

    port = free_port()
    c, n = run(identity(), conf(hub_pki, port=8883, proxy=_proxy(f"http://127.0.0.1:{port}")))
    assert n.statuses[-1].startswith("retrying: hub unreachable (proxy: "), n.statuses
    assert n.failed is None
    proxy = ConnectProxy(auth=("agent", "right"))
    proxy_port = proxy.start()
    try:
        url = f"http://agent:wrong@127.0.0.1:{proxy_port}"
        c, n = run(identity(), conf(hub_pki, port=8883, proxy=_proxy(url)))
        assert n.statuses[-1].startswith("retrying: hub unreachable (proxy: "), n.statuses
        assert "407" in n.statuses[-1] and "wrong" not in n.everything()
    finally:
        proxy.stop()


@pytest.mark.skipif(not HAVE_SOCKS, reason="python3-socks is not installed")
def test_the_proxys_answer_reaches_the_status_and_journal_escaped(hub_pki, run):
    from tests.hubsim.proxy import ConnectProxy

    proxy = ConnectProxy(answer=b"HTTP/1.1 403 Forbidden\x1b[31m\xc2\x9b2J\r\n\r\n")
    proxy_port = proxy.start()
    try:
        url = f"http://127.0.0.1:{proxy_port}"
        c, n = run(identity(), conf(hub_pki, port=8883, proxy=_proxy(url)))
    finally:
        proxy.stop()
    assert "403: Forbidden\\x1b[31m\\x9b2J" in n.statuses[-1], n.statuses
    assert all(text.isprintable() for text in n.statuses), n.statuses
    assert all(line.isprintable() for line in n.everything().splitlines())


def test_one_attempt_gives_the_hubs_answer_and_the_cause_apart(hub_pki):
    # Callers that phrase their own line (the pre-flight probe, check's hub-auth) use one
    # Link.open() and read the refusal's parts without parsing the journal line.
    from defender_setup.agent import hubnet, sas

    broker, auth = sas_hub(hub_pki)
    try:
        link = hubnet.Link(identity(key=WRONG_KEY), conf(hub_pki, port=broker.port))
        token = sas.new_token(identity().resource, WRONG_KEY, 60)
        session = link.open(token, time.time, timeout=5)
        session.close()
        result = session.result
        assert result.kind == "rejected" and session.connack == 5
        assert result.answer == "CONNACK 5, not authorized"
        assert result.cause.startswith("likely a wrong SharedAccessKey")
        assert result.text == f"hub rejected localhost as {DEVICE}/{MODULE}: not authorized " \
                              f"(CONNACK 5): {result.cause}"
        assert broker.wait_for(lambda: broker.connections[-1].closed is not None, 5)
    finally:
        broker.stop()


class _BrokenSet(hub.Identity):
    """An identity whose facts cannot be gathered: a stand-in for a bug in the twin's code."""

    @property
    def method(self):
        raise RuntimeError("a bug in the report")


def test_a_bug_in_the_twin_report_turns_it_off_and_keeps_the_connection(hub_pki, run):
    broker, _ = sas_hub(hub_pki)
    ident = _BrokenSet("localhost", DEVICE, MODULE, None, KEY)
    c, n = run(ident, conf(hub_pki, port=broker.port, twin_interval=1), broker)
    assert n.failed is None and c.state == "connected"
    assert n.statuses[-1] == f"connected to localhost as {DEVICE}/{MODULE}"
    assert n.wait(lambda: any(line.startswith("twin: ") for _, line in n.lines), 5)
    off = [line for level, line in n.lines if line.startswith("twin: ")]
    assert off == ["twin: reported properties turned off after an internal error: "
                   "RuntimeError at test_hub.py:" + off[0].rpartition(":")[2]], off
    assert c.twin is None
    # the connection carries on: a message sent after the turn-off arrives on it
    c.send(b"after")
    assert broker.wait_for(lambda: any(p == b"after" for *_, p in broker.messages), 5)
    assert broker.twin_patches == [] and c.state == "connected"
    assert len(broker.accepted()) == 1, "reconnected"


def test_the_connector_reports_the_twin_and_a_failing_twin_is_just_retried(hub_pki, run):
    broker, _ = sas_hub(hub_pki, twin="fail", twin_status=429)
    c, n = run(identity(), conf(hub_pki, port=broker.port, twin_interval=1), broker)
    assert broker.wait_for(lambda: broker.twin_patches)
    assert n.wait(lambda: any("answered 429" in line for _, line in n.lines), 5)
    assert c.state == "connected" and n.failed is None and len(broker.accepted()) == 1
