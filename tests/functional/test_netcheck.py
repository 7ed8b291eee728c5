"""defender_setup.netcheck against the test hubs on loopback: every outcome of every check.

Real brokers (tests/hubsim: the SAS-verifying broker, its WebSocket/HTTPS listener that can
pretend its clock is off, Debian's mosquitto for X.509, the CONNECT proxy), real DNS (a name
under .invalid never resolves), real TLS. The identity stays on HUB and TLS goes to
GatewayHostName=localhost, a name of the test server certificate.
"""

import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from defender_setup import checks, netcheck
from tests.conftest import snapshot
from tests.hubroot import (
    DEVICE,
    HUB,
    MODULE,
    WRONG_KEY,
    configure,
    sas_hub,
    sas_text,
    store,
    validated,
    x509_text,
)
from tests.hubsim.dns import A, OnceNameServer, run_resolving_with
from tests.hubsim.mosquitto import MOSQUITTO, Mosquitto, free_port
from tests.hubsim.pki import Pki
from tests.hubsim.proxy import ConnectProxy
from tests.nobody import run_as_nobody, shared_tmpdir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clock_source(hub_pki):
    """A 443-style HTTPS listener (the broker's WebSocket side) whose Date is right."""
    broker = sas_hub(hub_pki, websocket=True)
    yield broker.port
    broker.stop()


def check(root, state=None, **kw) -> dict:
    """Run the local and the network checks; ``{id: CheckResult}``."""
    results = netcheck.extend(root, checks.run_checks(root, state), state, **kw)
    return {r.id: r for r in results}


def statuses(results: dict) -> dict:
    return {i: results[i].status for i in netcheck.NETWORK_IDS}


def sas_root(root, hub_pki, port, key=None, gateway="localhost", **settings):
    store(root, validated(sas_text(gateway=gateway, **({"key": key} if key else {}))))
    configure(root, hub_pki, port=port, **settings)
    return root


def test_reachable_hub_passes_every_check_and_the_key_is_accepted(hub_pki, sas_broker, clock_source,
                                                                   root):
    sas_root(root, hub_pki, sas_broker.port)
    before = snapshot(root)
    r = check(root, https_port=clock_source)
    assert statuses(r) == dict.fromkeys(netcheck.NETWORK_IDS, "ok"), r
    assert r["agent-settings"].status == "ok"
    assert r["hub-dns"].message.startswith("localhost resolves to 127.0.0.1")
    assert r["hub-tcp"].message.startswith(f"connected to localhost:{sas_broker.port} in ")
    assert "verified against ca_file" in r["hub-tls"].message
    assert "of the hub's (HTTP Date from localhost:" in r["hub-clock"].message
    assert r["hub-auth"].message == (f"the hub accepted {DEVICE}/{MODULE} with the stored key "
                                     "(CONNACK 0, accepted); disconnected at once")
    assert sas_broker.wait_for(lambda: all(c.closed for c in sas_broker.connections), 2)
    assert snapshot(root) == before  # check writes nothing


def test_refused_key_names_the_hubs_answer_and_the_agents_cause_hints(hub_pki, sas_broker, root):
    sas_root(root, hub_pki, sas_broker.port, key=WRONG_KEY)
    auth = check(root)["hub-auth"]
    assert auth.status == "error" and auth.exit_code == 65
    assert auth.message.startswith("the hub refused the stored key (CONNACK 5, not "
                                   "authorized): likely a wrong SharedAccessKey")
    assert WRONG_KEY not in auth.message


def test_unresolvable_name_fails_dns_and_skips_what_depends_on_it(hub_pki, root):
    sas_root(root, hub_pki, free_port(), gateway="hub.invalid")
    r = check(root)
    assert r["hub-dns"].status == "error" and r["hub-dns"].exit_code == 69
    assert "cannot resolve hub.invalid" in r["hub-dns"].message
    assert "GatewayHostName" in r["hub-dns"].message
    assert {i: r[i].message for i in netcheck.NETWORK_IDS[1:]} == {
        "hub-tcp": "needs hub-dns", "hub-tls": "needs hub-tcp", "hub-clock": "needs hub-dns",
        "hub-auth": "needs hub-tls"}


def test_refused_port_fails_tcp(hub_pki, root):
    port = free_port()
    sas_root(root, hub_pki, port)
    r = check(root, https_port=free_port())
    assert r["hub-tcp"].status == "error"
    assert r["hub-tcp"].message.startswith(f"connection refused by localhost:{port}: a firewall")
    assert r["hub-tls"].status == r["hub-auth"].status == "skipped"
    assert r["hub-clock"].status == "skipped" and "no time source" in r["hub-clock"].message


def test_blocked_mqtt_port_with_443_open_says_to_use_websocket(hub_pki, clock_source, root):
    sas_root(root, hub_pki, free_port())
    tcp = check(root, https_port=clock_source)["hub-tcp"]
    assert tcp.status == "error"
    assert f'localhost:{clock_source} is open: set "transport": "websocket"' in tcp.message
    # a file that uses Microsoft's key is told to change that key (adding ours would conflict)
    sas_root(root, hub_pki, free_port(), IothubModule_TransportProtocol="MQTT_Protocol")
    tcp = check(root, https_port=clock_source)["hub-tcp"]
    assert (f'localhost:{clock_source} is open: set "IothubModule_TransportProtocol": '
            '"MQTT_WebSocket_Protocol"') in tcp.message


def test_unknown_ca_is_named(hub_pki, sas_broker, root, tmp_path):
    other = Pki(tmp_path / "other", seed=1)   # conf.json trusts an unrelated CA
    sas_root(root, other, sas_broker.port)
    tls = check(root)["hub-tls"]
    assert tls.status == "error" and tls.exit_code == 69
    assert "is not trusted (unknown CA: " in tls.message and "ca_file" in tls.message
    assert check(root)["hub-auth"].message == "needs hub-tls"


def tls_against(root, pki):
    """hub-tls against a test hub whose server certificate comes from ``pki`` (trusted)."""
    broker = sas_hub(pki)
    try:
        sas_root(root, pki, broker.port)
        return check(root)["hub-tls"]
    finally:
        broker.stop()


@pytest.mark.parametrize("server, words", [
    ({"names": ("elsewhere.example",)}, "does not name localhost (name mismatch"),
    ({"server_days": (-10, -1)}, "has expired at the local time"),
])
def test_wrong_host_name_and_expired_certificate_are_named(root, tmp_path, server, words):
    tls = tls_against(root, Pki(tmp_path / "pki", **server))
    assert tls.status == "error" and words in tls.message, tls


@pytest.mark.parametrize("offset, status, pattern", [
    # HTTP Date has whole seconds: a second either way
    (-600, "error", r"the local clock is (9 min 59|10 min [01]) s ahead of the hub's \(local "),
    (90, "warning", r"the local clock is 1 min (29|30|31) s behind the hub's \(local "),
])
def test_clock_skew_against_the_hubs_http_date(hub_pki, sas_broker, root, offset, status,
                                               pattern):
    skewed = sas_hub(hub_pki, websocket=True, clock=lambda: time.time() + offset)
    try:
        sas_root(root, hub_pki, sas_broker.port)
        clock = check(root, https_port=skewed.port)["hub-clock"]
    finally:
        skewed.stop()
    assert clock.status == status, clock
    assert re.match(pattern, clock.message), clock.message
    assert "timedatectl set-ntp true" in clock.message
    assert clock.exit_code == (78 if status == "error" else 0)


def test_websocket_transport_reads_the_date_from_the_hubs_own_port(hub_pki, root):
    broker = sas_hub(hub_pki, websocket=True)
    try:
        sas_root(root, hub_pki, broker.port, transport="websocket")
        r = check(root)
    finally:
        broker.stop()
    assert statuses(r) == dict.fromkeys(netcheck.NETWORK_IDS, "ok"), r
    assert f"HTTP Date from localhost:{broker.port}" in r["hub-clock"].message


def test_through_a_proxy(hub_pki, sas_broker, clock_source, root):
    proxy = ConnectProxy()
    port = proxy.start()
    try:
        sas_root(root, hub_pki, sas_broker.port, proxy=f"http://127.0.0.1:{port}")
        r = check(root, https_port=clock_source)
    finally:
        proxy.stop()
    assert statuses(r) == dict.fromkeys(netcheck.NETWORK_IDS, "ok"), r
    assert r["hub-dns"].message == (f"proxy http://127.0.0.1:{port} resolves to 127.0.0.1 and "
                                    "answers; the proxy resolves localhost")
    assert "through the proxy" in r["hub-tcp"].message
    assert f"localhost:{sas_broker.port}" in proxy.targets


def test_proxy_refusing_the_credentials(hub_pki, sas_broker, root):
    proxy = ConnectProxy(auth=("user", "right-pw"))
    port = proxy.start()
    try:
        sas_root(root, hub_pki, sas_broker.port, proxy=f"http://user:s3cret-pw@127.0.0.1:{port}")
        r = check(root)
    finally:
        proxy.stop()
    assert r["hub-dns"].status == "ok"
    assert r["hub-tcp"].status == "error"
    assert r["hub-tcp"].message.startswith(f"the proxy http://127.0.0.1:{port} refused CONNECT "
                                           f"localhost:{sas_broker.port}: 407")
    assert "check \"proxy\"" in r["hub-tcp"].message
    assert "s3cret-pw" not in json.dumps([x.as_dict() for x in r.values()])


def test_proxy_from_microsofts_key_refusing_the_credentials(hub_pki, sas_broker, root):
    proxy = ConnectProxy(auth=("user", "right-pw"))
    port = proxy.start()
    try:
        sas_root(root, hub_pki, sas_broker.port,
                 IothubModule_ProxyConfig=f"127.0.0.1,{port},user,s3cret-pw")
        r = check(root)
    finally:
        proxy.stop()
    assert r["agent-settings"].status == "ok"
    assert r["hub-tcp"].message.startswith(f"the proxy http://127.0.0.1:{port} refused CONNECT "
                                           f"localhost:{sas_broker.port}: 407")
    assert 'check "IothubModule_ProxyConfig"' in r["hub-tcp"].message
    assert "s3cret-pw" not in json.dumps([x.as_dict() for x in r.values()])


def test_the_proxys_answer_cannot_write_into_checks_output(hub_pki, root):
    proxy = ConnectProxy(answer=b"HTTP/1.1 403 Forbidden\x1b[2K\x1b[1A[ ok ] fine\x07\r\n\r\n")
    port = proxy.start()
    try:
        sas_root(root, hub_pki, free_port(), proxy=f"http://127.0.0.1:{port}")
        tcp = check(root)["hub-tcp"]
    finally:
        proxy.stop()
    assert tcp.status == "error"
    assert "refused CONNECT localhost:" in tcp.message
    assert "403: Forbidden\\x1b[2K\\x1b[1A[ ok ] fine\\x07" in tcp.message, tcp.message
    assert tcp.message.isprintable(), tcp.message


def test_a_connected_agent_is_not_knocked_off(hub_pki, sas_broker, root):
    sas_root(root, hub_pki, sas_broker.port)
    state = {"active": True, "summary": "active (running)",
             "status_text": f"connected to {HUB} as {DEVICE}/{MODULE}"}
    auth = check(root, state)["hub-auth"]
    assert auth.status == "ok"
    assert auth.message.startswith(f"not connecting a second time: the running agent reports "
                                   f"'connected to {HUB} as {DEVICE}/{MODULE}'")
    assert sas_broker.connections == []   # no CONNECT reached the hub
    # an agent that is retrying is no answer: the check connects itself
    state["status_text"] = "retrying: hub unreachable (TCP: connection refused)"
    assert check(root, state)["hub-auth"].message.startswith("the hub accepted")


def test_stalling_hub_keeps_every_check_bounded(hub_pki, root):
    # accepts TCP, then never says a word: each check gives up after its own bound
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    try:
        sas_root(root, hub_pki, server.getsockname()[1])
        start = time.monotonic()
        r = check(root, https_port=free_port())
        elapsed = time.monotonic() - start
    finally:
        server.close()
        for conn, _ in held:
            conn.close()
    assert r["hub-tls"].status == "error" and "no answer to the TLS handshake" in \
        r["hub-tls"].message
    assert elapsed < netcheck.PER_CHECK + 3


def test_silent_broker_auth_is_bounded(hub_pki, clock_source, root):
    broker = sas_hub(hub_pki, mode="silent")  # TLS, then never a CONNACK
    try:
        sas_root(root, hub_pki, broker.port)
        start = time.monotonic()
        r = check(root, https_port=clock_source)
        elapsed = time.monotonic() - start
    finally:
        broker.stop()
    assert r["hub-tls"].status == "ok"
    assert r["hub-auth"].status == "error" and "no answer to CONNECT" in r["hub-auth"].message
    assert elapsed < netcheck.BUDGET + 1


def test_budget_used_up_skips_the_rest(hub_pki, sas_broker, root):
    sas_root(root, hub_pki, sas_broker.port)
    r = check(root, budget=0.0)
    assert all(r[i].message == "not run: the network checks' 0 s are used up"
               for i in netcheck.NETWORK_IDS)


def test_offline_and_dont_run(hub_pki, sas_broker, root):
    sas_root(root, hub_pki, sas_broker.port)
    r = check(root, offline=True)
    assert all(r[i].status == "skipped" and r[i].message == "not run (--offline)"
               for i in netcheck.NETWORK_IDS)
    assert sas_broker.connections == []
    r = check(root, dont_run=("hub-auth", "hub-tls", "secret-file-modes"))
    assert r["hub-auth"].message == r["hub-tls"].message == "not run (--dont-run)"
    assert r["secret-file-modes"].message == "not run (--dont-run)"
    assert r["hub-clock"].status != "skipped" or "needs" not in r["hub-clock"].message
    assert sas_broker.connections == []


def test_invalid_conf_json_is_its_own_check_and_blocks_the_network_ones(root, hub_pki):
    sas_root(root, hub_pki, 8883, transport="tcp")
    r = check(root)
    assert r["agent-settings"].status == "error" and r["agent-settings"].exit_code == 78
    assert all(r[i].message == "needs a valid conf.json (agent-settings)"
               for i in netcheck.NETWORK_IDS)


def test_dont_run_lists_agent_settings_as_skipped_even_when_conf_json_is_invalid(root, hub_pki):
    sas_root(root, hub_pki, 8883, transport="tcp")
    r = check(root, dont_run=("agent-settings",))
    assert r["agent-settings"].status == "skipped"
    assert r["agent-settings"].message == "not run (--dont-run)"


def test_unconfigured_skips_the_network_checks(root):
    r = check(root)
    assert all(r[i].message == "needs valid stored credentials (credentials-valid)"
               for i in netcheck.NETWORK_IDS)


# -- X.509 against mosquitto ------------------------------------------------------------------
@pytest.mark.parametrize("registered", [True, False])
@pytest.mark.allow_subprocess("mosquitto")
@pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto is not installed")
def test_certificate_identity(hub_pki, root, tmp_path, registered):
    cert, key = (hub_pki.client if registered else hub_pki.stranger)(f"{DEVICE}/{MODULE}")
    store(root, validated(x509_text(), cert.read_bytes(), key.read_bytes()))
    with Mosquitto(hub_pki, tmp_path) as mosq:
        configure(root, hub_pki, port=mosq.port)
        r = check(root, dont_run=("hub-clock",))
    assert r["hub-tls"].status == "ok", r["hub-tls"]
    auth = r["hub-auth"]
    if registered:
        assert auth.status == "ok" and "with the stored certificate" in auth.message, auth
    else:
        assert auth.status == "error" and auth.exit_code == 65, auth
        assert auth.message.startswith("the hub refused the stored certificate (TLS alert: ")
        assert "-----BEGIN" not in auth.message


# -- the command line --------------------------------------------------------------------------
@pytest.mark.allow_subprocess("setpriv", "python3")
@pytest.mark.parametrize("agent", ["ours", "microsoft"])
def test_check_as_another_user_says_it_needs_root(hub_pki, agent):
    """In the directory of the agent in use: Microsoft's 4.1.2 reads /etc (target.detect)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent directory must be root's")
    top = shared_tmpdir()
    try:
        where = top / "var/defender_iot_micro_agent"
        if agent == "microsoft":
            (top / "var/lib/dpkg").mkdir(parents=True)
            (top / "var/lib/dpkg/status").write_text(
                "Package: defender-iot-micro-agent\nStatus: install ok installed\n"
                "Version: 4.1.2\n")
            where = top / "etc/defender_iot_micro_agent"
        store(top, validated(sas_text()))   # the agent directory is root's, 0700
        before = snapshot(top)
        r = run_as_nobody([sys.executable, "-m", "defender_setup", "check", "--root", str(top)])
        assert r.returncode == 77, r
        assert r.stderr.startswith("defender-setup: check needs root: the credentials in "
                                   f"{where} are readable by root only"), r
        assert "sudo defender-setup check" in r.stderr
        assert snapshot(top) == before
    finally:
        shutil.rmtree(top)


def test_cli_check_exit_code_and_json_shape(hub_pki, sas_broker, root, capsys):
    from defender_setup import cli

    sas_root(root, hub_pki, sas_broker.port, key=WRONG_KEY)
    code = cli.main(["check", "--json", "--root", str(root), "--dont-run", "hub-clock"])
    checks_out = json.loads(capsys.readouterr().out)["checks"]
    assert code == 65
    assert all(set(c) == {"id", "description", "status", "message", "exit_code"}
               for c in checks_out)
    # the hub's checks, then the DPS checks (skipped here: not provisioned through DPS)
    assert [c["id"] for c in checks_out][-10:] == ["agent-settings", *netcheck.NETWORK_IDS,
                                                   "dps-dns", "dps-tcp", "dps-tls", "dps-auth"]
    code = cli.main(["check", "--root", str(root), "--dont-run", "hub-auth,hub-nonsense"])
    out, err = capsys.readouterr()
    assert code == 0, out
    assert "no check named hub-nonsense" in err


@pytest.mark.allow_subprocess("unshare")
def test_silent_name_server_is_bounded(hub_pki, root, tmp_path):
    # glibc alone waits 20 s and more for a name server that never answers; a private mount
    # namespace gives `check` a resolv.conf naming a UDP socket that never does
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private resolv.conf")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    address = f"127.53.{os.getpid() % 250}.9"
    try:
        silent.bind((address, 53))
    except OSError:
        pytest.skip(f"cannot listen on {address}:53")
    with silent:
        sas_root(root, hub_pki, free_port(), gateway="silent-dns.example")
        start = time.monotonic()
        r = run_resolving_with(address, [sys.executable, "-m", "defender_setup", "check",
                                         "--json", "--root", str(root)], tmp_path,
                               cwd=REPO, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                              "PYTHONPATH": str(REPO)},
                               capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    dns = {c["id"]: c for c in json.loads(r.stdout)["checks"]}["hub-dns"]
    assert dns["status"] == "error", r.stderr
    assert dns["message"].startswith("no answer for silent-dns.example within 3 s"), dns
    assert elapsed < 10  # the whole check, a cold process included, even on a loaded machine


@pytest.mark.allow_subprocess("unshare")
def test_a_name_server_that_answers_once_does_not_stall_check(hub_pki, sas_broker, root,
                                                             tmp_path):
    # hub-dns looks the name up (bounded); every later check connects to what it found: a
    # second lookup would meet a silent name server and glibc's unbounded wait
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private resolv.conf")
    sas_root(root, hub_pki, sas_broker.port, gateway=None)  # TLS and TCP to HostName itself
    with OnceNameServer({HUB: "127.0.0.1"}) as dns:
        start = time.monotonic()
        r = run_resolving_with(dns.address, [sys.executable, "-m", "defender_setup", "check",
                                             "--json", "--root", str(root)], tmp_path,
                               cwd=REPO, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                              "PYTHONPATH": str(REPO)},
                               capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    got = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    for check_id in ("hub-dns", "hub-tcp", "hub-tls", "hub-auth"):
        assert got[check_id]["status"] == "ok", got[check_id]
    assert got["hub-auth"]["message"].startswith("the hub accepted"), got["hub-auth"]
    assert dns.queries.count((HUB, A)) == 1, dns.queries
    assert elapsed < netcheck.BUDGET  # a cold process included


def test_the_hubs_certificate_cannot_write_into_checks_output(root, tmp_path, capsys):
    from defender_setup import cli

    pki = Pki(tmp_path / "pki", cn="localhost\n[ ok ] hub-auth: forged\x1b[31m",
              ca_cn="Evil CA\r\x1b]0;owned\x07")
    broker = sas_hub(pki)
    try:
        sas_root(root, pki, broker.port)
        cli.main(["check", "--root", str(root), "--dont-run", "hub-clock,hub-auth"])
        out = capsys.readouterr().out
    finally:
        broker.stop()
    tls = out.split("hub-tls: ", 1)[1].split("\n")[1]
    assert "CN=localhost\\n[ ok ] hub-auth: forged\\x1b[31m, issued by CN=Evil CA\\r" \
        "\\x1b]0;owned\\x07," in tls, out
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out), out
    assert re.findall(r"^\[.{4}\] hub-auth:.*", out, re.M) == [
        "[skip] hub-auth: the hub accepts the stored identity"]
