"""The .deb in booted Debian 12 containers: install, reconfigure, invalid answers, remove, purge.

Each test boots the cached base image with a volatile overlay (nothing leaks between tests)
and installs the package with apt, as an administrator would (docs/testing.md).
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from conftest import AGENT_DIR, UNIT

VERDICT = "stable for"  # defender-setup restart's healthy verdict line


def state(ct) -> dict:
    return ct.show(UNIT, "ActiveState", "SubState", "InvocationID", "MainPID", "NRestarts",
                   "Result", "UnitFileState")


def agent_files(ct) -> dict:
    """name -> (mode, sha256) of everything in the agent directory (generations included)."""
    out = ct.run(["find", AGENT_DIR, "-printf", "%P %m %y\\n"], check=False).stdout
    files = {}
    for line in out.splitlines():
        name, mode, kind = line.rsplit(" ", 2)
        digest = ""
        if kind == "f":
            digest = hashlib.sha256(ct.run(["cat", f"{AGENT_DIR}/{name}"]).stdout.encode()
                                    ).hexdigest()
        files[name] = (mode, kind, digest)
    return files


def journal_cursor(ct) -> str:
    out = ct.run(["journalctl", "-n0", "--show-cursor", "--no-pager"]).stdout
    return out.strip().rsplit("cursor: ", 1)[-1]


def starts_since(ct, cursor: str) -> list:
    """Invocation ids of the unit's completed start jobs logged after ``cursor`` (by PID 1)."""
    ct.run(["journalctl", "--sync"], check=False)
    out = ct.run(["journalctl", "-u", UNIT, f"--after-cursor={cursor}", "-o", "json",
                  "--no-pager"]).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    return [e.get("INVOCATION_ID") for e in entries
            if e.get("JOB_TYPE") == "start" and e.get("JOB_RESULT") == "done"]


def reconfigure(ct, lines, check=True):
    ct.preseed(lines)
    return ct.run(["dpkg-reconfigure", "-fnoninteractive", "defender-setup"], check=check,
                  env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=180)


def put_identity(ct, identity, cn="dev1", **kw):
    cert, key = identity(cn=cn, **kw)
    ct.copy_in(cert, "/root/device.pem", 0o644)
    ct.copy_in(key, "/root/device.key", 0o600)
    return cert, key


def key_body(key_pem: bytes) -> list[str]:
    """Distinctive pieces of a PEM key's base64 body (to grep for leaks)."""
    lines = [x for x in key_pem.decode().splitlines() if x and not x.startswith("-----")]
    return [lines[1], lines[-2]]


def assert_no_leak(ct, secrets, rejected_by_reconfigure=False) -> None:
    """No secret in debconf's databases, the journal, apt's and dpkg's logs.

    ``rejected_by_reconfigure``: a failed dpkg-reconfigure exits without saving debconf's
    database (dpkg-reconfigure's own rule), so the rejected, preseeded secret stays where the
    administrator put it, root-only passwords.dat; everything else must still be clean.
    """
    ct.run(["journalctl", "--sync"], check=False)
    databases = "/var/cache/debconf/config.dat* /var/cache/debconf/templates.dat*" \
        if rejected_by_reconfigure else "/var/cache/debconf/*.dat*"
    dump = ct.sh(f"cat {databases} /var/log/dpkg.log /var/log/apt/* "
                 "2>/dev/null || true; journalctl -o verbose --no-pager", timeout=60).stdout
    for secret in secrets:
        assert secret not in dump, "secret material found in debconf, a log or the journal"


# -- install ----------------------------------------------------------------------------------
def test_install_without_answers_is_unconfigured_and_quiet_then_configure(booted, preseed):
    result = booted.install_deb()
    assert "dpkg-reconfigure defender-setup" in result.stdout + result.stderr
    st = state(booted)
    assert st["UnitFileState"] == "enabled"
    assert st["ActiveState"] == "inactive" and st["NRestarts"] == "0", st
    assert not booted.exists(f"{AGENT_DIR}/connection_string.txt")
    # Not crash-looping: still inactive a moment later, never started.
    booted.run(["sleep", "1"])
    assert state(booted)["ActiveState"] == "inactive"

    result = reconfigure(booted, preseed.for_connection_string())
    assert VERDICT in result.stdout + result.stderr
    assert state(booted)["ActiveState"] == "active"


def test_apt_install_connection_string(booted, preseed):
    key = preseed.sas_key(7)
    cursor = journal_cursor(booted)
    result = booted.install_deb(preseed.for_connection_string(preseed.connection_string(key=key)))
    out = result.stdout + result.stderr
    assert VERDICT in out and key not in out
    st = state(booted)
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert starts_since(booted, cursor) == [st["InvocationID"]], "not exactly one start"
    modes = booted.run(["stat", "-c", "%n %a %U", AGENT_DIR, f"{AGENT_DIR}/connection_string.txt"]
                       ).stdout.split("\n")
    assert modes[0].endswith(" 700 root") and modes[1].endswith(" 600 root"), modes
    assert key in booted.read(f"{AGENT_DIR}/connection_string.txt")
    assert_no_leak(booted, [key])


def test_apt_install_certificate(booted, preseed, identity):
    _, key_pem = put_identity(booted, identity)
    result = booted.install_deb(preseed.for_certificate())
    assert VERDICT in result.stdout + result.stderr
    assert state(booted)["ActiveState"] == "active"
    for name in ("connection_string.txt", "certificate_public.pem", "certificate_private.pem"):
        assert booted.exists(f"{AGENT_DIR}/{name}")
    assert "x509=true" in booted.read(f"{AGENT_DIR}/connection_string.txt")
    status = booted.run(["defender-setup", "status"]).stdout
    assert "dev1" in status and "certificate" in status
    assert_no_leak(booted, key_body(key_pem))


# -- reconfigure --------------------------------------------------------------------------------
def test_reconfigure_switches_methods_with_exactly_one_restart(booted, preseed, identity):
    sas = preseed.sas_key(3)
    booted.install_deb(preseed.for_connection_string(preseed.connection_string(key=sas)))
    _, key_pem = put_identity(booted, identity)

    for lines, present, gone in (
            (preseed.for_certificate(), "certificate_private.pem", None),
            (preseed.for_connection_string(preseed.connection_string(key=sas)), None,
             "certificate_private.pem")):
        before = state(booted)
        cursor = journal_cursor(booted)
        result = reconfigure(booted, lines)
        after = state(booted)
        assert VERDICT in result.stdout + result.stderr
        assert after["ActiveState"] == "active"
        assert after["InvocationID"] != before["InvocationID"]
        assert after["NRestarts"] == before["NRestarts"]
        assert starts_since(booted, cursor) == [after["InvocationID"]], "not exactly one start"
        if present:
            assert booted.exists(f"{AGENT_DIR}/{present}")
        if gone:
            assert not booted.exists(f"{AGENT_DIR}/{gone}")
            assert not booted.exists(f"{AGENT_DIR}/certificate_public.pem")

    assert_no_leak(booted, [sas, *key_body(key_pem)])


def test_reconfigure_without_new_answers_keeps_credentials(booted, preseed):
    booted.install_deb(preseed.for_connection_string())
    files = agent_files(booted)
    result = booted.run(["dpkg-reconfigure", "-fnoninteractive", "defender-setup"])
    assert VERDICT in result.stdout + result.stderr
    assert {k: v for k, v in agent_files(booted).items() if k.startswith("connection")} == \
        {k: v for k, v in files.items() if k.startswith("connection")}


def test_upgrade_from_the_single_package_restarts_exactly_once_and_keeps_credentials(
        boot, base, previous_release, preseed):
    """The release before the split (one package, defender-setup) upgraded to this build's
    two: dpkg hands the unit, generator and runtime over to defender-setup-agent (Breaks +
    Replaces), the identity stays, the agent restarts once and stays enabled."""
    ct = boot(base, binds={str(previous_release.parent): "/srv/previous"})
    ct.install_deb(preseed.for_connection_string(), deb=f"/srv/previous/{previous_release.name}")
    files, before = agent_files(ct), state(ct)
    assert before["ActiveState"] == "active"
    cursor = journal_cursor(ct)
    result = ct.install_deb()
    after = state(ct)
    out = result.stdout + result.stderr
    assert VERDICT in out, out
    assert after["ActiveState"] == "active" and after["UnitFileState"] == "enabled"
    assert starts_since(ct, cursor) == [after["InvocationID"]] != [before["InvocationID"]]
    current = {k: v for k, v in agent_files(ct).items() if not k.startswith(".")}
    assert current == {k: v for k, v in files.items() if not k.startswith(".")}
    owner = ct.run(["dpkg", "-S", "/lib/systemd/system/defender-iot-micro-agent.service",
                    "/lib/systemd/system-generators/defender-setup-generator"]).stdout
    assert owner.count("defender-setup-agent:") == 2, owner
    assert ct.run(["dpkg", "--audit"]).stdout == ""


# -- invalid answers ----------------------------------------------------------------------------
def _bad_connection_strings(preseed):
    good = preseed.connection_string()
    return {
        "smart quotes and garbage": "\u201c" + good + "\u201d;;Garbage",
        "key not base64": good.replace(preseed.sas_key(), "not*base64*at*all"),
        "missing device": good.replace("DeviceId=dev1;", ""),
        "hub-level policy": good + ";SharedAccessKeyName=iothubowner",
    }


@pytest.mark.parametrize("kind", ["smart quotes and garbage", "key not base64",
                                  "missing device", "hub-level policy"])
def test_invalid_connection_string_changes_nothing(booted, preseed, kind):
    booted.install_deb(preseed.for_connection_string())
    files, before = agent_files(booted), state(booted)
    bad = _bad_connection_strings(preseed)[kind]
    result = reconfigure(booted, preseed.for_connection_string(bad), check=False)
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.startswith("defender-setup: invalid")]
    assert len(lines) == 1, result.stderr
    assert "defender-setup/connection-string" in lines[0]
    assert preseed.sas_key() not in result.stdout + result.stderr
    assert agent_files(booted) == files
    after = state(booted)
    assert (after["InvocationID"], after["ActiveState"]) == (before["InvocationID"], "active")
    assert_no_leak(booted, [preseed.sas_key()], rejected_by_reconfigure=True)


@pytest.mark.parametrize("kind", ["expired", "mismatched key", "missing file"])
def test_invalid_certificate_changes_nothing(booted, preseed, identity, kind):
    booted.install_deb(preseed.for_connection_string())
    if kind == "expired":
        put_identity(booted, identity, days=-1)
    elif kind == "mismatched key":
        cert, _ = identity(cn="dev1")
        _, other = identity(cn="dev1", key="p256")
        booted.copy_in(cert, "/root/device.pem", 0o644)
        booted.copy_in(other, "/root/device.key")
    files, before = agent_files(booted), state(booted)
    result = reconfigure(booted, preseed.for_certificate(), check=False)
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.startswith("defender-setup: invalid")]
    assert len(lines) == 1, result.stderr
    assert agent_files(booted) == files
    assert state(booted)["InvocationID"] == before["InvocationID"]


def test_symlinked_target_is_refused(booted, preseed):
    booted.install_deb(preseed.for_connection_string())
    booted.sh(f"mv {AGENT_DIR}/connection_string.txt /root/elsewhere.txt; "
              f"ln -s /root/elsewhere.txt {AGENT_DIR}/connection_string.txt")
    before = booted.read("/root/elsewhere.txt")
    result = reconfigure(booted, preseed.for_connection_string(
        preseed.connection_string(key=preseed.sas_key(9))), check=False)
    assert result.returncode != 0
    assert "symbolic link" in result.stderr
    assert booted.read("/root/elsewhere.txt") == before
    assert booted.run(["test", "-L", f"{AGENT_DIR}/connection_string.txt"]).returncode == 0


# A 16-byte key pasted without "SharedAccessKey=": base64 that also looks like a key name.
BARE_KEY = "TKOxREbXrjk6v8BC2aFKRg=="


def bare_key_string(preseed) -> str:
    return preseed.connection_string().split("SharedAccessKey=")[0] + BARE_KEY


@pytest.mark.parametrize("kind", ["mis-cased key", "bare key"])
def test_fresh_install_with_invalid_preseed_fails_and_writes_nothing(booted, preseed, kind):
    bad = preseed.connection_string().replace("HostName=", "Host=") \
        if kind == "mis-cased key" else bare_key_string(preseed)
    result = booted.install_deb(preseed.for_connection_string(bad), check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    lines = [x for x in out.splitlines() if x.startswith("defender-setup: invalid")]
    assert len(lines) == 1, out
    assert "defender-setup/connection-string" in lines[0]
    assert not booted.exists(f"{AGENT_DIR}/connection_string.txt")
    assert state(booted)["ActiveState"] == "inactive"
    # Nothing of what failed the rules is echoed, or kept in debconf's world-readable files
    # (the error's variables included: the config script ran twice, before and after unpack).
    assert BARE_KEY[:8] not in out
    assert_no_leak(booted, [preseed.sas_key(), BARE_KEY[:8]])


# -- interactive ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mis-cased key", "bare key"])
def test_teletype_reasks_a_bad_answer_with_the_error(booted, preseed, kind, suite):
    booted.install_deb()
    good = preseed.connection_string(key=preseed.sas_key(5))
    bad = good.replace("HostName=", "Hostname=") if kind == "mis-cased key" \
        else bare_key_string(preseed)
    # method 1 (connection string), the bad string, strict verification "no", the hub probe
    # "yes", sealing "no" (asked from Debian 12 on); the error is shown and only the connection
    # string is asked again: the good one.
    sealing = "" if suite == "bullseye" else "no\n"
    answers = f"1\n{bad}\nno\nyes\n{sealing}{good}\n"
    # Debian 13's teletype frontend wants a controlling terminal: script(1) gives it one,
    # with echo off so that the output holds only what the frontend prints.
    result = booted.run(["script", "-q", "--echo", "never", "-ec",
                         "dpkg-reconfigure -fteletype defender-setup", "/dev/null"],
                        input=answers, env={"DEBIAN_FRONTEND": "teletype"}, timeout=180)
    out = result.stdout + result.stderr
    said = " ".join(out.split())  # the frontend wraps lines
    assert "Invalid connection string" in said, out
    assert ("did you mean HostName?" if kind == "mis-cased key"
            else "write SharedAccessKey= before it") in said, out
    assert "Hostname" not in out and BARE_KEY[:8] not in out  # only known keys are named
    assert VERDICT in out
    assert good.split("SharedAccessKey=")[1] in booted.read(f"{AGENT_DIR}/connection_string.txt")
    assert preseed.sas_key(5) not in out
    assert_no_leak(booted, [preseed.sas_key(5), BARE_KEY[:8]])


# -- remove and purge ----------------------------------------------------------------------------
def test_remove_keeps_credentials_and_purge_leaves_nothing(booted, preseed):
    metrics = "/var/lib/prometheus/node-exporter/defender_setup.prom"
    booted.run(["mkdir", "-p", "/var/lib/prometheus/node-exporter"])  # node_exporter's
    booted.install_deb(preseed.for_connection_string())
    assert booted.exists(metrics)  # written by the trigger's restart when it ended
    booted.run(["apt-get", "remove", "-y", "defender-setup"],
               env={"DEBIAN_FRONTEND": "noninteractive"})
    assert state(booted)["ActiveState"] in ("inactive", "failed")
    assert booted.exists(f"{AGENT_DIR}/connection_string.txt")
    assert not booted.exists(metrics)  # a removed package's metrics would be frozen
    assert booted.exists("/var/lib/prometheus/node-exporter")  # node_exporter's, kept

    booted.run(["apt-get", "purge", "-y", "defender-setup"],
               env={"DEBIAN_FRONTEND": "noninteractive"})
    assert not booted.exists(AGENT_DIR)
    assert not booted.exists("/etc/defender_iot_micro_agent")
    assert not booted.exists("/etc/systemd/system/multi-user.target.wants/" + UNIT)
    leftovers = booted.sh("grep -l 'defender-setup' /var/cache/debconf/*.dat || true").stdout
    assert leftovers.strip() == "", leftovers
    assert booted.run(["dpkg", "-l", "defender-setup"], check=False).returncode != 0 or \
        "un " in booted.run(["dpkg", "-l", "defender-setup"], check=False).stdout


# -- zero-touch: a preseeded dps install on the running device ----------------------------------
def test_apt_install_dps_group_key_registers_and_connects(booted, preseed, tmp_path):
    """auth-method dps with an enrollment group key, on the device itself (a running system):
    the postinst registers with DPS (the stand-in on the host), the device makes its own
    module, the trigger restarts the agent once, and no key is left anywhere."""
    from tests.hubsim.zerotouch import HUBS, Stand

    group = base64.b64encode(bytes((i * 3 + 1) % 256 for i in range(64))).decode()
    with Stand(tmp_path / "stand") as stand:
        stand.dps.group("fleet", group, HUBS[0])
        booted.sh("install -d -m 0755 /etc/defender_iot_micro_agent")
        booted.run(["sh", "-c", "cat > /etc/defender_iot_micro_agent/hub-ca.pem"],
                   input=stand.pki.ca_file.read_text())
        booted.run(["sh", "-c", "cat > /etc/defender_iot_micro_agent/conf.json"],
                   input=json.dumps({"ca_file": "/etc/defender_iot_micro_agent/hub-ca.pem",
                                     "port": stand.mqtt_port, "https_port": stand.https_port}))
        machine = booted.read("/etc/machine-id").strip()
        result = booted.install_deb([
            preseed.line("auth-method", "select", "dps"),
            preseed.line("dps-id-scope", "string", stand.id_scope),
            preseed.line("dps-symmetric-key", "password", group),
            preseed.line("dps-key-is-group-key", "boolean", "true"),
            preseed.line("dps-endpoint", "string", f"{HUBS[0]}:{stand.dps_port}")])
        out = result.stdout + result.stderr
        assert f"assigned: hub {HUBS[0]}, device {machine}" in out, out
        assert VERDICT in out and group not in out
        assert stand.dps.registrations[machine]["assignedHub"] == HUBS[0]
        assert any(c.client_id == f"{machine}/DefenderIotMicroAgent"
                   for c in stand.hubs[HUBS[0]].broker.accepted())
        report = json.loads(booted.run(["defender-setup", "status", "--json"]).stdout)
        assert report["origin"]["source"] == "dps"
        assert booted.run(["debconf-show", "defender-setup"]).stdout.count("dps") >= 2
        assert_no_leak(booted, [group])
        assert booted.run(["grep", "-rlF", group, "/etc", "/var"], check=False).stdout == ""
