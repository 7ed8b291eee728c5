"""defender_setup.probe against the test hubs: new credentials tried before anything is written.

Real brokers on loopback (tests/hubsim: the SAS-verifying broker, Debian's mosquitto for
X.509), real TLS; the root is a throw-away tree, and "nothing written" is checked on it.
"""

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from defender_setup import probe
from tests import certfactory
from tests.conftest import snapshot
from tests.hubroot import (
    DEVICE,
    HUB,
    MODULE,
    WRONG_KEY,
    configure,
    sas_hub,
    sas_text,
    validated,
    x509_text,
)
from tests.hubsim.dns import A, OnceNameServer, run_resolving_with
from tests.hubsim.mosquitto import MOSQUITTO, Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]


def connections_to(port: int) -> list:
    """This process's sockets whose peer is 127.0.0.1:port (the hub's side is not counted)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket, or already closed
        with sock:
            try:
                if sock.getpeername()[1] == port:
                    found.append(name)
            except (OSError, IndexError, TypeError):
                pass
    return found


def test_accepted_key_answers_and_holds_no_connection(hub_pki, sas_broker, root):
    configure(root, hub_pki, port=sas_broker.port)
    files = snapshot(root)
    outcome = probe.probe(validated(sas_text()), root)
    assert outcome.kind == probe.ACCEPTED, outcome.line
    assert outcome.line == (f"probe: the hub accepted testhub.azure-devices.net as {DEVICE}/"
                            f"{MODULE} (CONNACK 0, accepted); connection closed")
    assert sas_broker.accepted()[-1].client_id == f"{DEVICE}/{MODULE}"
    # closed by us before the answer: we hold no socket to the hub, and the hub saw the end
    assert connections_to(sas_broker.port) == []
    assert sas_broker.wait_for(lambda: sas_broker.connections[-1].closed is not None, 2)
    assert snapshot(root) == files


def test_refused_key_is_the_hubs_answer_naming_the_field(hub_pki, sas_broker, root):
    configure(root, hub_pki, port=sas_broker.port)
    files = snapshot(root)
    outcome = probe.probe(validated(sas_text(key=WRONG_KEY)), root)
    assert outcome.kind == probe.REFUSED
    assert outcome.line.startswith("probe: the hub refused this key (CONNACK 5, not "
                                   "authorized): likely a wrong SharedAccessKey")
    error = outcome.error
    assert error.label == "connection string" and error.exit_code == 65
    assert str(error).startswith("connection string: the hub refused this key (CONNACK 5")
    assert WRONG_KEY not in outcome.line and "SharedAccessSignature" not in outcome.line
    assert "\n" not in outcome.line
    assert connections_to(sas_broker.port) == []
    assert sas_broker.wait_for(lambda: sas_broker.connections[-1].closed is not None, 2)
    assert snapshot(root) == files


@pytest.mark.parametrize("gateway, expect", [
    ("hub.invalid", "DNS: cannot resolve hub.invalid"),
    ("localhost", "TCP: connection refused by localhost:"),
])
def test_unreachable_hub_is_accepted_with_a_note_at_once(hub_pki, root, gateway, expect):
    configure(root, hub_pki, port=free_port())
    start = time.monotonic()
    outcome = probe.probe(validated(sas_text(gateway=gateway)), root)
    assert time.monotonic() - start < 1.0
    assert outcome.kind == probe.UNREACHABLE and outcome.error is None
    assert expect in outcome.line
    assert outcome.line.endswith("the key is accepted without the hub's answer")


def test_a_silent_hub_costs_at_most_the_probes_timeout(hub_pki, root):
    broker = sas_hub(hub_pki, mode="silent")  # TCP and TLS, then never a CONNACK
    try:
        configure(root, hub_pki, port=broker.port)
        start = time.monotonic()
        outcome = probe.probe(validated(sas_text()), root, timeout=2.0)
        elapsed = time.monotonic() - start
    finally:
        broker.stop()
    assert outcome.kind == probe.UNREACHABLE, outcome.line
    assert "MQTT: no answer to CONNECT" in outcome.line
    assert elapsed < 2.5


@pytest.mark.allow_subprocess("unshare")
def test_a_name_server_that_answers_once_does_not_stall_the_probe(hub_pki, sas_broker, root,
                                                                  tmp_path):
    # The probe's own lookup is bounded; anything that looks the name up again meets a name
    # server gone silent and glibc's unbounded wait (2 tries of 5 s)
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private resolv.conf")
    configure(root, hub_pki, port=sas_broker.port)
    key = tmp_path / "key.txt"
    key.write_bytes(sas_text(gateway=None))  # TLS and TCP to HostName itself
    with OnceNameServer({HUB: "127.0.0.1"}) as dns:
        start = time.monotonic()
        r = run_resolving_with(dns.address, [
            sys.executable, "-m", "defender_setup", "apply", "--probe", "--no-restart",
            "--connection-string-file", str(key), "--root", str(root)], tmp_path,
            cwd=REPO, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert f"probe: the hub accepted {HUB} as {DEVICE}/{MODULE} (CONNACK 0" in r.stdout, r.stdout
    assert dns.queries.count((HUB, A)) == 1, dns.queries
    assert elapsed < probe.PROBE_TIMEOUT  # a cold process included


def test_invalid_conf_json_skips_the_probe(root):
    configure(root, transport="carrier-pigeon")
    outcome = probe.probe(validated(sas_text()), root)
    assert outcome.kind == probe.SKIPPED and "transport" in outcome.line


def test_through_the_proxy(hub_pki, sas_broker, root):
    from tests.hubsim.proxy import ConnectProxy

    proxy = ConnectProxy()
    port = proxy.start()
    try:
        configure(root, hub_pki, port=sas_broker.port, proxy=f"http://127.0.0.1:{port}")
        outcome = probe.probe(validated(sas_text()), root)
        assert outcome.kind == probe.ACCEPTED, outcome.line
        assert f"localhost:{sas_broker.port}" in proxy.targets
    finally:
        proxy.stop()


# -- X.509: mosquitto requires client certificates from the test CA ---------------------------
x509 = pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto is not installed")


@pytest.fixture
def mosquitto(hub_pki, tmp_path):
    with Mosquitto(hub_pki, tmp_path) as running:
        yield running


def certificate_set(cert_path, key_path):
    return validated(x509_text(), cert_path.read_bytes(), key_path.read_bytes())


@x509
@pytest.mark.allow_subprocess("mosquitto")
def test_registered_certificate_is_accepted_from_memory(hub_pki, mosquitto, root):
    configure(root, hub_pki, port=mosquitto.port)
    before = snapshot(root)
    outcome = probe.probe(certificate_set(*hub_pki.client(f"{DEVICE}/{MODULE}")), root)
    assert outcome.kind == probe.ACCEPTED, outcome.line
    assert snapshot(root) == before


@x509
@pytest.mark.allow_subprocess("mosquitto")
def test_unknown_certificate_is_refused_naming_the_certificate(hub_pki, mosquitto, root):
    configure(root, hub_pki, port=mosquitto.port)
    cert, key = hub_pki.stranger(f"{DEVICE}/{MODULE}")
    # TLS 1.3 refuses after the handshake; a CONNECT already written can turn the alert into
    # a reset. The probe listens first, so it hears the refusal every time.
    for _ in range(5):
        outcome = probe.probe(certificate_set(cert, key), root)
        assert outcome.kind == probe.REFUSED, outcome.line
    assert outcome.line.startswith("probe: the hub refused this certificate (TLS alert: ")
    assert outcome.error.label == "certificate"
    assert "not registered" in outcome.line
    assert not any(line in outcome.line for line in certfactory.body(key.read_bytes()))


def test_apply_probe_writes_nothing_when_the_hub_refuses(hub_pki, sas_broker, root, tmp_path,
                                                          capsys):
    from defender_setup import cli

    configure(root, hub_pki, port=sas_broker.port)
    before = snapshot(root)
    wrong = tmp_path / "wrong.txt"
    wrong.write_bytes(sas_text(key=WRONG_KEY))
    code = cli.main(["apply", "--probe", "--no-restart", "--connection-string-file", str(wrong),
                     "--root", str(root)])
    out, err = capsys.readouterr()
    assert code == 65
    assert err.startswith("defender-setup: error: connection string: the hub refused this key "
                          "(CONNACK 5, not authorized)")
    assert snapshot(root) == before
    assert (out + err).count("the hub refused") == 1
    assert WRONG_KEY not in out + err
    right = tmp_path / "right.txt"
    right.write_bytes(sas_text())
    code = cli.main(["apply", "--probe", "--no-restart", "--connection-string-file", str(right),
                     "--root", str(root)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "probe: the hub accepted testhub.azure-devices.net as dev1/" in out
    assert "written: connection_string.txt" in out
