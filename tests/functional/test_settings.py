"""Agent settings read by an unprivileged process (root reads any file)."""

import importlib.util
import shutil
import sys

import pytest

from tests.nobody import run_as_nobody, shared_tmpdir

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.mark.allow_subprocess("setpriv", "python3")
def test_unreadable_ca_file():
    top = shared_tmpdir()  # root reads any file: the parse runs as nobody
    try:
        ca = top / "ca.pem"
        ca.write_bytes(PEM)
        ca.chmod(0)
        code = ("from pathlib import Path\n"
                "from defender_setup.agent.settings import SettingsError, parse\n"
                "try:\n"
                f"    parse('{{\"ca_file\": \"/ca.pem\"}}', root=Path('{top}'))\n"
                "except SettingsError as err:\n"
                "    print(err)\n")
        r = run_as_nobody([sys.executable, "-c", code])
    finally:
        shutil.rmtree(top)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "conf.json: ca_file: cannot read /ca.pem: permission denied; the agent runs "
           "unprivileged: make the CA file (and its directory) readable by all, e.g. chmod "
           "0644\n", "")


# Microsoft's keys, read by the agent process as its own keys are (tests/functional/test_hub.py
# proves those): the same conf.json serves Microsoft's agent and this one.

@pytest.fixture
def agent_root(tmp_path):
    from tests.agentproc import Agent

    started = []

    def start(root):
        agent = Agent.start(root, tmp_path)
        started.append(agent)
        return agent

    yield tmp_path / "root", start
    for agent in started:
        agent.close()


@pytest.mark.allow_subprocess("python3")
def test_agent_connects_over_websocket_with_microsofts_transport_key(hub_pki, agent_root):
    from tests.agentproc import DEVICE, HUB, MODULE, configure
    from tests.hubroot import sas_hub

    root, start = agent_root
    broker = sas_hub(hub_pki, websocket=True)
    try:
        configure(root, hub_pki, broker.port,
                  extra={"IothubModule_TransportProtocol": "MQTT_WebSocket_Protocol"})
        agent = start(root)
        status = agent.wait_status(lambda s: not s.startswith("starting"))
        assert status == f"connected to {HUB} as {DEVICE}/{MODULE}"
        assert [c.transport for c in broker.accepted()] == ["websocket"]
        code, _, err = agent.terminate()
    finally:
        broker.stop()
    assert code == 0 and "(websocket)" in err, err


@pytest.mark.allow_subprocess("python3")
@pytest.mark.skipif(importlib.util.find_spec("socks") is None,
                    reason="python3-socks is not installed (a proxy needs it)")
def test_agent_connects_through_microsofts_proxy_config_never_showing_the_password(
        hub_pki, agent_root):
    from tests.agentproc import DEVICE, HUB, MODULE, configure
    from tests.hubroot import sas_hub
    from tests.hubsim.proxy import ConnectProxy

    root, start = agent_root
    broker = sas_hub(hub_pki)
    proxy = ConnectProxy(auth=("agent", "pr0xy,pass"))  # a comma in it: the rest is the password
    proxy_port = proxy.start()
    try:
        configure(root, hub_pki, broker.port, extra={
            "IothubModule_ProxyConfig": f"127.0.0.1,{proxy_port},agent,pr0xy,pass",
            "IothubModule_TransportProtocol": "MQTT_Protocol"})
        agent = start(root)
        status = agent.wait_status(lambda s: not s.startswith("starting"))
        assert status == f"connected to {HUB} as {DEVICE}/{MODULE}"
        assert proxy.targets == [f"localhost:{broker.port}"]  # through the proxy, authenticated
        code, _, err = agent.terminate()
    finally:
        proxy.stop()
        broker.stop()
    assert code == 0 and "pr0xy" not in err and "pr0xy" not in "".join(agent.messages), err


@pytest.mark.allow_subprocess("python3")
@pytest.mark.parametrize("extra,line", [
    ({"IothubModule_TransportProtocol": "AMQP_Protocol"},
     "IothubModule_TransportProtocol: this agent speaks MQTT only: use MQTT_Protocol instead "
     "of AMQP_Protocol"),
    ({"transport": "mqtt", "IothubModule_TransportProtocol": "MQTT_Protocol"},
     "transport and IothubModule_TransportProtocol both set the transport: keep one of them"),
    ({"proxy": "http://127.0.0.1:3128", "IothubModule_ProxyConfig": "127.0.0.1,3128,a,pr0xy"},
     "proxy and IothubModule_ProxyConfig both set the proxy: keep one of them"),
], ids=["amqp", "transport-both-ways", "proxy-both-ways"])
def test_agent_refuses_in_one_line_and_exits_78(hub_pki, agent_root, extra, line):
    from tests.agentproc import configure

    root, start = agent_root
    configure(root, hub_pki, 8883, extra=extra)
    agent = start(root)
    code, err = agent.proc.wait(20), agent.proc.stderr.read()
    errors = [text for text in err.splitlines() if text.startswith("not starting: ")]
    assert code == 78
    assert len(errors) == 1 and line in errors[0] and "Traceback" not in err, err
    assert "pr0xy" not in err
