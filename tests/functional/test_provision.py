"""``defender-setup provision`` end to end against the stand-ins (tests/hubsim/zerotouch.py):
a DPS over real TLS, two hubs with their module REST API and MQTT, the agent as a process.

Nothing is mocked between the command and the sockets: registration with its polls, the
module created with the device's credentials, the set stored through the core, the agent
connecting with the module made. Every refusal is one line naming it, and changes nothing.
"""

import base64
import json
import os
import signal
import subprocess
import time

import pytest

from defender_setup import zerotouch
from defender_setup.agentdir import AgentDir
from defender_setup.dps import enrollment
from defender_setup.dpsclient import Bounds
from tests import certfactory
from tests.agentproc import Agent
from tests.clirun import Run
from tests.conftest import snapshot
from tests.hubsim.https import SilentPort
from tests.hubsim.zerotouch import Stand

SCOPE = "0ne00000A0A"
HUB_A, HUB_B = "127.0.0.1", "127.0.0.2"
GROUP_KEY = base64.b64encode(bytes(range(1, 33))).decode()
DEVICE_KEY = base64.b64encode(b"individual-device-key-0123456789").decode()
MODULE = "DefenderIotMicroAgent"
CS = "var/defender_iot_micro_agent/connection_string.txt"
pytestmark = pytest.mark.allow_subprocess("python3")  # the agent and SIGTERM's process
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def stand(tmp_path):
    with Stand(tmp_path / "stand") as s:
        s.dps.group("fleet", GROUP_KEY, HUB_A)
        yield s


@pytest.fixture
def run(stand, root, tmp_path, capsys, monkeypatch):
    stand.conf(root)
    return Run(root, tmp_path, capsys, monkeypatch)


def provision(run, stand, *more, key=GROUP_KEY, option="--group-key-file"):
    return run("provision", "--id-scope", SCOPE, "--endpoint", stand.endpoint,
               "--no-restart", *([option, "-"] if option else []), *more,
               stdin=key.encode() + b"\n")


def secrets_absent(texts, *secrets):
    for secret in secrets:
        for text in texts:
            assert secret not in text


def tree_text(root) -> str:
    return "".join(repr(v[1]) for v in snapshot(root).values())


def test_a_group_key_provisions_the_device_and_the_agent_connects(run, stand, root, tmp_path):
    code, out, err = provision(run, stand, "--registration-id", "dev-1")
    assert (code, err) == (0, "")
    assert "assigned: hub 127.0.0.1, device dev-1 (initialAssignment)" in out
    assert f"module dev-1/{MODULE} created on 127.0.0.1 (with a key made on this device)" in out
    text = (root / CS).read_text()
    assert text.startswith(f"HostName={HUB_A};DeviceId=dev-1;ModuleId={MODULE};"
                           "SharedAccessKey=")
    module_key = text.split("SharedAccessKey=")[1].strip()
    assert stand.hubs[HUB_A].rest.modules[("dev-1", MODULE)] == module_key  # made here
    agent = AgentDir(root)
    assert agent.origin()["source"] == "dps"
    record = agent.record("dps.json")
    assert {k: record[k] for k in ("id_scope", "registration_id", "assigned_hub", "device_id",
                                   "attestation", "group_key", "endpoint")} == {
        "id_scope": SCOPE, "registration_id": "dev-1", "assigned_hub": HUB_A,
        "device_id": "dev-1", "attestation": "symmetric-key", "group_key": True,
        "endpoint": stand.endpoint}
    kept = agent.state / "dps-device-key"
    assert oct(kept.stat().st_mode & 0o777) == "0o600"
    from tests.hubsim.dps import derive
    assert json.loads(kept.read_text()) == {"key": derive(GROUP_KEY, "dev-1")}
    # the group key is never written, the module key only in the set, nothing printed
    secrets_absent([tree_text(root)], GROUP_KEY)
    secrets_absent([out, err, json.dumps(record)], GROUP_KEY, module_key,
                   derive(GROUP_KEY, "dev-1"))
    # status shows where it came from
    code, status, _ = run("status")
    assert "DPS:             registration dev-1, ID scope 0ne00000A0A" in status
    assert "DPS assignment:  hub 127.0.0.1, device dev-1, last registered 20" in status
    # the agent, as a process, connects with the module made
    hub = stand.hubs[HUB_A].broker
    proc = Agent.start(root, tmp_path)
    try:
        status = proc.wait_status(lambda s: s.startswith("connected"), 15)
    finally:
        proc.terminate()
    assert status == f"connected to {HUB_A} as dev-1/{MODULE}"
    assert [c.client_id for c in hub.accepted()] == [f"dev-1/{MODULE}"]


def test_the_registration_id_defaults_to_the_machine_id(run, stand, root):
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    code, out, _ = provision(run, stand)
    assert code == 0
    assert ("0123456789abcdef0123456789abcdef", MODULE) in stand.hubs[HUB_A].rest.modules


def test_an_individual_enrollment_waits_out_the_polls(run, stand, root):
    stand.dps.individual("dev-2", DEVICE_KEY, HUB_B)
    stand.dps.polls, stand.dps.retry_after = 3, 0.1
    code, out, _ = provision(run, stand, "--registration-id", "dev-2", key=DEVICE_KEY,
                             option="--symmetric-key-file")
    assert code == 0, out
    methods = [r.method for r in stand.dps.server.requests]
    assert methods == ["PUT", "GET", "GET", "GET"]  # 202, assigning twice, assigned
    assert (root / CS).read_text().startswith(f"HostName={HUB_B};DeviceId=dev-2;")


def test_x509_registers_with_the_certificate_and_creates_the_module_with_it(run, stand, root):
    stand.dps.x509_group("factory", HUB_A)
    cert, key = stand.device_cert("dev-x509")
    code, out, err = run("provision", "--id-scope", SCOPE, "--endpoint", stand.endpoint,
                         "--no-restart", "--certificate", str(cert), "--private-key", str(key))
    assert code == 0, err
    assert "registering dev-x509 with DPS" in out and "an X.509 certificate" in out
    put = stand.hubs[HUB_A].rest.server.requests[-1]
    assert put.peer_cn == "dev-x509" and "authorization" not in put.headers
    assert (root / CS).read_text().startswith(f"HostName={HUB_A};DeviceId=dev-x509;")
    assert not (AgentDir(root).state / "dps-device-key").exists()


def test_a_certificate_refused_in_the_tls_handshake_is_unauthorized(run, stand, root):
    import ssl

    # DPS answers an unknown certificate with HTTP 401 (tested above for keys); a server that
    # refuses it in the handshake (TLS 1.2: the alert comes within it) is named the same way
    stand.dps.server.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    stand.dps.x509_group("factory", HUB_A)
    cert, key = stand.device_cert("dev-x509", issuer=certfactory.make_ca("Unknown CA"))
    code, out, err = run("provision", "--id-scope", SCOPE, "--endpoint", stand.endpoint,
                         "--no-restart", "--certificate", str(cert), "--private-key", str(key))
    assert code == 65 and "unauthorized" in err and "certificate" in err, err
    assert not (root / "var").exists()


def test_running_it_again_changes_nothing(run, stand, root):
    assert provision(run, stand, "--registration-id", "dev-1")[0] == 0
    before = snapshot(root / "var")
    code, out, _ = provision(run, stand, "--registration-id", "dev-1")
    assert code == 0
    assert f"module dev-1/{MODULE} updated on 127.0.0.1 (the stored key kept)" in out
    assert "unchanged:" in out
    after = snapshot(root / "var")
    assert {k: v for k, v in after.items() if "dps" not in k} == \
        {k: v for k, v in before.items() if "dps" not in k}
    puts = stand.hubs[HUB_A].rest.server.requests
    assert [r.headers.get("if-match") for r in puts] == [None, None, "*"]


def one_line_and_nothing_written(result, root, code, *words):
    got, out, err = result
    assert got == code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]
    assert not (root / "var").exists()
    secrets_absent([out, err], GROUP_KEY, DEVICE_KEY)
    return lines[0]


def test_a_wrong_key_is_unauthorized(run, stand, root):
    wrong = base64.b64encode(b"w" * 32).decode()
    line = one_line_and_nothing_written(provision(run, stand, "--registration-id", "dev-1",
                                                  key=wrong), root, 65, "unauthorized",
                                        "HTTP 401")
    assert line.startswith("defender-setup: error: DPS enrollment group key: unauthorized")
    assert wrong not in line


def test_a_disabled_enrollment_is_named(run, stand, root):
    stand.dps.disable("fleet")
    line = one_line_and_nothing_written(provision(run, stand, "--registration-id", "dev-1"),
                                        root, 78, "disabled")
    assert "DPS enrollment: disabled: the enrollment of dev-1 is disabled in DPS" in line


def test_throttling_says_how_long_to_wait(run, stand, root):
    stand.dps.throttle = 30
    one_line_and_nothing_written(provision(run, stand, "--registration-id", "dev-1"), root,
                                 75, "throttled", "wait 30 s")


def test_an_unreachable_dps_is_named(run, stand, root):
    with SilentPort() as port:
        pass  # closed again: nothing listens there now
    result = run("provision", "--id-scope", SCOPE, "--endpoint", f"localhost:{port}",
                 "--registration-id", "dev-1", "--no-restart", "--group-key-file", "-",
                 stdin=GROUP_KEY.encode())
    one_line_and_nothing_written(result, root, 69, "cannot reach localhost:")


def test_the_hub_refusing_the_device_is_named(run, stand, root):
    stand.hubs[HUB_A].rest.refuse_all = True
    one_line_and_nothing_written(provision(run, stand, "--registration-id", "dev-1"), root,
                                 65, "unauthorized: the hub 127.0.0.1 refused the module")


@pytest.mark.parametrize("answer,words", [
    ((200, {"status": "assigned", "pad": "x" * 100_000}, {}), "larger than 65536 bytes"),
    ((202, {"status": "assigning"}, {}), "gave no operationId"),
    ((200, {"status": "assigned", "registrationState": {"deviceId": "dev-1"}}, {}),
     "named no hub"),
])
def test_a_dps_that_floods_or_talks_nonsense_is_named(run, stand, root, answer, words):
    stand.dps.server.handle = lambda req: answer
    one_line_and_nothing_written(provision(run, stand, "--registration-id", "dev-1"), root,
                                 69, words)


@pytest.mark.parametrize("args,field", [
    (("--id-scope", "One00000A0A"), "DPS ID scope"),
    (("--registration-id", "Dev-1"), "DPS registration ID"),
    (("--endpoint", "https://x"), "DPS endpoint"),
])
def test_bad_input_is_one_line_before_any_request(run, stand, root, args, field):
    argv = ["provision", "--id-scope", SCOPE, "--registration-id", "dev-1", "--endpoint",
            stand.endpoint, "--no-restart", "--group-key-file", "-", *args]
    one_line_and_nothing_written(run(*argv, stdin=GROUP_KEY.encode()), root, 65, field)
    assert stand.dps.server.requests == []


@pytest.mark.parametrize("option", ["--group-key", "--group-key-file", "--symmetric-key-file"])
def test_a_key_given_instead_of_its_file_is_never_repeated(run, stand, option):
    code, out, err = run("provision", "--id-scope", SCOPE, option, GROUP_KEY)
    assert code == 66 and "looks like a key" in err
    secrets_absent([out, err], GROUP_KEY)


# -- the bounds: a stalled peer, with the bounds scaled down through the seam -----------------
def bounded(stand, root, bounds, **kw):
    import io

    e = enrollment(SCOPE, "dev-1", group_key=GROUP_KEY.encode(), root=root, **kw)
    out = io.StringIO()
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        zerotouch.run(root, e, restart=False, out=out, bounds=bounds)
    return info.value, time.monotonic() - started


def test_the_default_bounds_are_30_s_a_request_and_2_minutes_in_all():
    assert (Bounds().request, Bounds().total) == (30.0, 120.0)


def test_a_dps_that_never_answers_is_abandoned_at_the_request_bound(stand, root):
    stand.conf(root)
    stand.dps.server.stall = True  # TLS completes, the answer never comes
    err, took = bounded(stand, root, Bounds(request=1.0, total=5.0), endpoint=stand.endpoint)
    assert err.exit_code == 69 and "no answer from" in str(err) and "within 1 s" in str(err)
    assert 1.0 <= took < 2.0
    assert not (root / "var").exists()


def test_a_dps_that_trickles_bytes_is_abandoned_at_the_request_bound_too(stand, root):
    stand.conf(root)
    stand.dps.server.trickle = True  # a byte every 0.1 s: no read ever times out
    err, took = bounded(stand, root, Bounds(request=1.0, total=5.0), endpoint=stand.endpoint)
    assert err.exit_code == 69 and "within 1 s" in str(err)
    assert 1.0 <= took < 2.0


def test_a_tls_handshake_that_never_ends_is_abandoned_too(stand, root):
    stand.conf(root)
    with SilentPort() as port:
        err, took = bounded(stand, root, Bounds(request=1.0, total=5.0),
                            endpoint=f"localhost:{port}")
    assert err.exit_code == 69 and took < 2.0, str(err)


def test_polls_and_retry_after_end_at_the_total_bound(stand, root):
    stand.conf(root)
    stand.dps.assigning_forever, stand.dps.retry_after = True, 0.4
    err, took = bounded(stand, root, Bounds(request=1.0, total=2.0), endpoint=stand.endpoint)
    assert err.exit_code == 69 and "did not assign dev-1 within 2 s" in str(err)
    assert took < 2.5
    assert len(stand.dps.server.requests) >= 3  # it did poll, honouring Retry-After


def test_sigterm_ends_provision_within_2_s_and_no_secret_reaches_argv_or_env(stand, root):
    stand.conf(root)
    stand.dps.server.stall = True
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO}
    key_file = root / "group.key"
    key_file.write_text(GROUP_KEY)
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-m", "defender_setup", "provision", "--root", str(root),
         "--id-scope", SCOPE, "--registration-id", "dev-1", "--endpoint", stand.endpoint,
         "--group-key-file", "-", "--no-restart"],
        stdin=key_file.open("rb"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 15
        while not stand.dps.server.requests and time.monotonic() < deadline:
            time.sleep(0.02)  # polling for the request to arrive, not a fixed wait
        assert stand.dps.server.requests, "the request never arrived"
        for name in ("cmdline", "environ"):
            with open(f"/proc/{proc.pid}/{name}", "rb") as handle:
                assert GROUP_KEY.encode() not in handle.read()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
        took = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
    assert took < 2.0
    assert proc.returncode == 143
    assert err.decode().strip().splitlines() == [
        "defender-setup: error: interrupted by SIGTERM while registering; nothing was written"]
    assert not (root / "var").exists()
    secrets_absent([out.decode(), err.decode()], GROUP_KEY)


# -- re-provisioning inside the verification, against a fake systemctl ---------------------
def settle_here(root, fake, monkeypatch, boot=False):
    import io

    from defender_setup.service import Service
    from defender_setup.verify import settle
    from tests.fakes import FakeClock, FakeJournal

    fake.path_env(monkeypatch)
    out, clock = io.StringIO(), FakeClock()
    svc = Service(root, environ={}, journal=lambda: FakeJournal(), manages_root=True)
    result = settle(root, timeout=30, strict=False, out=out, service=svc, clock=clock,
                    sleep=clock.sleep, boot=boot)
    return result, out.getvalue()


@pytest.fixture
def provisioned(stand, booted_root, tmp_path, capsys, monkeypatch):
    """dev-1 provisioned on hub A, then re-assigned to hub B and deleted from hub A."""
    stand.conf(booted_root)
    run = Run(booted_root, tmp_path, capsys, monkeypatch)
    assert provision(run, stand, "--registration-id", "dev-1")[0] == 0
    stand.dps.reassign("dev-1", HUB_B)
    stand.hubs[HUB_A].rest.remove_device("dev-1")
    return booted_root


def registrations(stand) -> int:
    return sum(r.method == "PUT" for r in stand.dps.server.requests)


@pytest.mark.allow_subprocess("systemctl")
def test_a_device_the_old_hub_refuses_registers_again_and_follows(provisioned, stand,
                                                                   tmp_path, monkeypatch):
    from tests.fakes import FakeSystemd, failed, running

    fake = FakeSystemd(tmp_path, [running("inv-0")],
                       [{"states": [failed("inv-1", 76)]}, {"states": [running("inv-2")]}])
    result, out = settle_here(provisioned, fake, monkeypatch)
    assert (result.code, result.outcome) == (0, "healthy"), out
    assert "the hub refused the module identity: registering with DPS again (once)" in out
    assert "assigned: hub 127.0.0.2, device dev-1 (reprovisionedToNewHub)" in out
    assert (provisioned / CS).read_text().startswith(f"HostName={HUB_B};DeviceId=dev-1;")
    assert ("dev-1", MODULE) in stand.hubs[HUB_B].rest.modules
    assert AgentDir(provisioned).record("dps.json")["assigned_hub"] == HUB_B
    assert AgentDir(provisioned).origin()["source"] == "dps"
    assert len(fake.restarts()) == 2
    secrets_absent([out], GROUP_KEY)


@pytest.mark.allow_subprocess("systemctl")
def test_re_provisioning_is_tried_once_then_the_usual_roll_back(provisioned, stand, tmp_path,
                                                               monkeypatch):
    from tests.fakes import FakeSystemd, failed, running

    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [failed("inv-1", 76)]}])
    before = registrations(stand)
    result, out = settle_here(provisioned, fake, monkeypatch)
    assert result.code == 69, out
    assert registrations(stand) == before + 1  # once, not once per failed restart
    assert "the re-provisioned identity fails too" in out
    assert "rolled back to the previous credentials" in out
    assert len(fake.restarts()) == 3  # refused, re-provisioned, rolled back


@pytest.mark.allow_subprocess("systemctl")
def test_at_boot_re_provisioning_is_tried_once_a_boot(provisioned, stand, tmp_path,
                                                      monkeypatch):
    from tests.fakes import FakeSystemd, failed, running

    stand.dps.disable("fleet")  # it fails: the next boot-time verification must not retry
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [failed("inv-1", 76)]}])
    _, out = settle_here(provisioned, fake, monkeypatch, boot=True)
    assert "re-provisioning failed: DPS enrollment: disabled" in out
    marker = provisioned / zerotouch.MARKER
    # root's, like the probe note beside it (which refuses a directory others can read)
    assert (marker.stat().st_mode & 0o777, marker.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    AgentDir(provisioned).rollback()  # the refused set back (origin "rollback"): still DPS's
    before = registrations(stand)
    _, out = settle_here(provisioned, fake, monkeypatch, boot=True)
    assert "not tried again: tried once this boot already" in out
    assert registrations(stand) == before


@pytest.mark.allow_subprocess("systemctl")
def test_a_set_not_from_dps_is_never_re_provisioned(stand, booted_root, tmp_path, monkeypatch,
                                                    capsys, sas_inputs):
    from tests.fakes import FakeSystemd, failed, running

    run = Run(booted_root, tmp_path, capsys, monkeypatch)
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    fake = FakeSystemd(tmp_path, [running("inv-0")], [{"states": [failed("inv-1", 76)]}])
    _, out = settle_here(booted_root, fake, monkeypatch)
    assert "DPS" not in out and stand.dps.server.requests == []


# -- the agent's unit failed: defender-setup reprovision (its OnFailure= unit) ---------------
def reprovision_here(root, fake, monkeypatch, capsys):
    from defender_setup import cli
    from defender_setup.service import Service
    from tests.fakes import FakeJournal

    fake.path_env(monkeypatch)  # the real clock: one stability window (1.5 s) when it restarts
    svc = Service(root, environ={}, journal=lambda: FakeJournal(), manages_root=True)
    code = cli.main(["reprovision", "--root", str(root)], service=svc)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.allow_subprocess("systemctl")
def test_an_agent_the_hub_refused_at_boot_follows_its_device_to_the_new_hub(
        provisioned, stand, tmp_path, monkeypatch, capsys):
    """No command ran: the agent started at boot (or reconnected) and the old hub refused it;
    its unit's OnFailure= runs 'reprovision', which registers again and verifies."""
    from tests.fakes import FakeSystemd, failed, running

    fake = FakeSystemd(tmp_path, [failed("inv-1", 76)], [{"states": [running("inv-2")]}])
    code, out = reprovision_here(provisioned, fake, monkeypatch, capsys)
    assert code == 0, out
    assert "assigned: hub 127.0.0.2, device dev-1 (reprovisionedToNewHub)" in out
    assert (provisioned / CS).read_text().startswith(f"HostName={HUB_B};DeviceId=dev-1;")
    assert len(fake.restarts()) == 1
    assert (provisioned / zerotouch.MARKER).exists()  # once a boot
    secrets_absent([out], GROUP_KEY)


@pytest.mark.parametrize("state", ["running", "crashed", "refused again this boot"])
@pytest.mark.allow_subprocess("systemctl")
def test_reprovision_leaves_any_other_failure_alone(provisioned, stand, tmp_path, monkeypatch,
                                                    capsys, state):
    from tests.fakes import FakeSystemd, failed, running

    shown = {"running": running("inv-0"), "crashed": failed("inv-1", 1)}.get(
        state, failed("inv-1", 76))
    if state == "refused again this boot":
        (provisioned / zerotouch.MARKER).parent.mkdir(parents=True, exist_ok=True)
        (provisioned / zerotouch.MARKER).write_text("{}")
    before, text = registrations(stand), (provisioned / CS).read_bytes()
    fake = FakeSystemd(tmp_path, [shown], [])
    code, out = reprovision_here(provisioned, fake, monkeypatch, capsys)
    assert code == 0, out
    assert registrations(stand) == before and fake.restarts() == []
    assert (provisioned / CS).read_bytes() == text


# -- check -----------------------------------------------------------------------------------
def dps_checks(run) -> dict:
    code, out, _ = run("check", "--json")
    return {c["id"]: c for c in json.loads(out)["checks"] if c["id"].startswith("dps-")}


def test_check_asks_dps_where_the_device_is_without_changing_anything(run, stand, root):
    assert provision(run, stand, "--registration-id", "dev-1")[0] == 0
    puts = registrations(stand)
    checks = dps_checks(run)
    assert [checks[i]["status"] for i in ("dps-dns", "dps-tcp", "dps-tls", "dps-auth")] == \
        ["ok"] * 4, checks
    assert checks["dps-auth"]["message"] == "DPS assigns dev-1 to 127.0.0.1 as dev-1, as stored"
    assert registrations(stand) == puts  # a status query (POST), never a registration
    stand.dps.reassign("dev-1", HUB_B)
    stand.dps.registrations["dev-1"]["assignedHub"] = HUB_B  # as DPS says once re-assigned
    warning = dps_checks(run)["dps-auth"]
    assert warning["status"] == "warning" and "the device was re-assigned" in warning["message"]
    code, out, _ = run("check", "--json", "--offline")
    checks = json.loads(out)["checks"]
    assert {c["id"]: c["status"] for c in checks if c["id"].startswith("dps-")} == \
        dict.fromkeys(("dps-dns", "dps-tcp", "dps-tls", "dps-auth"), "skipped")
    # --offline wins over --dont-run, for the DPS checks as for the hub's
    code, out, _ = run("check", "--json", "--offline", "--dont-run", "dps-auth,hub-auth")
    messages = {c["id"]: c["message"] for c in json.loads(out)["checks"]}
    assert messages["dps-auth"] == messages["hub-auth"] == "not run (--offline)"


def test_check_skips_the_dps_checks_for_a_set_not_from_dps(run, sas_inputs):
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    checks = dps_checks(run)
    assert {c["status"] for c in checks.values()} == {"skipped"}
    assert checks["dps-auth"]["message"] == "not provisioned through DPS (defender-setup provision)"


@pytest.mark.allow_subprocess("systemd-creds")
def test_the_kept_device_key_is_sealed_with_the_set_and_unsealed_with_it(run, stand, root,
                                                                         tmp_path, monkeypatch):
    from defender_setup import provision as core
    from defender_setup import sealing
    from tests.fakes import FakeCreds, debian12, seal_here
    from tests.hubsim.dps import derive

    assert provision(run, stand, "--registration-id", "dev-1")[0] == 0
    debian12(root)
    FakeCreds(tmp_path).path_env(monkeypatch)
    agent = AgentDir(root)
    kept = agent.state / "dps-device-key"
    for seal_it in (True, False):  # what 'seal' and 'unseal' do, then the key follows
        stored = core.read(agent)
        sealing.store(agent, stored.loaded.files, stored.method, seal_it, defer=seal_here)
        zerotouch.key_like_set(agent)
        assert set(json.loads(kept.read_text())) == {"sealed" if seal_it else "key"}
        assert (derive(GROUP_KEY, "dev-1").encode() in kept.read_bytes()) is not seal_it
        assert zerotouch.device_key(root) == derive(GROUP_KEY, "dev-1").encode()
