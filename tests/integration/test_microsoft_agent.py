"""defender-setup provisioning Microsoft's own agent (a stand-in package, standin.py).

One booted container: the stand-in (``defender-iot-micro-agent`` 4.1.2, Microsoft's documented
layout) is installed first, then defender-setup alone, which it satisfies instead of
defender-setup-agent. Preseeded install, apply, a refused identity rolled back, a conf.json
change (the cache deleted), dpkg-reconfigure with one restart, rollback, status and check
naming the agent, and purge leaving Microsoft's files. Throughout, nothing of our runtime
(drop-in, generator line, credential, sandboxing) touches the stand-in's unit.

What it cannot prove: that Microsoft's real agent connects with these files (its repository
cannot be reached from here); see README.md.
"""

from __future__ import annotations

import json

import pytest
from conftest import UNIT
from standin import build_standin
from test_package import VERDICT, journal_cursor, reconfigure, starts_since

MS_DIR = "/etc/defender_iot_micro_agent"
CACHE = "/var/lib/defender_iot_micro_agent/cache.json"


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    return build_standin(tmp_path_factory.mktemp("standin"))


def unit_runs_as_shipped(ct) -> None:
    """The stand-in's own unit, unchanged by anything of ours, its process root's."""
    props = ct.show(UNIT, "FragmentPath", "DropInPaths", "User", "DynamicUser", "MainPID",
                    "ProtectSystem", "Description")
    assert props["FragmentPath"] == f"/lib/systemd/system/{UNIT}", props
    assert "stand-in" in props["Description"], props
    assert props["DropInPaths"] == "" and props["User"] == "", props
    assert props["DynamicUser"] == "no" and props["ProtectSystem"] == "no", props
    text = ct.run(["systemctl", "cat", UNIT]).stdout  # every file systemd read for it
    assert text.count("\n# /") + text.startswith("# /") == 1, text
    assert "Credential" not in text and "Protect" not in text, text
    uid = ct.run(["ps", "-o", "uid=", "-p", props["MainPID"]]).stdout.strip()
    assert uid == "0", uid


def connection_string(ct) -> str:
    return ct.read(f"{MS_DIR}/connection_string.txt")


def test_provision_microsoft_agent_apply_debconf_verify_rollback(boot, base, standin,
                                                                  preseed):
    ct = boot(base, binds={str(standin.parent): "/srv/ms"})
    ct.run(["dpkg", "-i", f"/srv/ms/{standin.name}"])
    ours = [d for d in ct.guest_debs() if "/defender-setup_" in d]
    ct.preseed(preseed.for_connection_string())
    result = ct.run(["apt-get", "install", "-y", "--no-install-recommends", *ours],
                    env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
    out = result.stdout + result.stderr
    assert VERDICT in out and "reports no hub status" in out, out
    packages = ct.run(["dpkg-query", "-W", "-f=${Package} ${Status}\\n"]).stdout
    assert "defender-iot-micro-agent install ok installed" in packages
    assert "defender-setup-agent" not in packages  # Microsoft's agent satisfied the Depends
    assert preseed.sas_key() in connection_string(ct)
    assert not ct.exists("/var/defender_iot_micro_agent")
    assert not ct.exists("/run/systemd/generator/defender-iot-micro-agent.service.d")
    unit_runs_as_shipped(ct)

    status = ct.run(["defender-setup", "status"]).stdout
    assert "Microsoft's defender-iot-micro-agent 4.1.2" in status, status
    assert f"agent directory: {MS_DIR}" in status, status
    checks = json.loads(ct.run(["defender-setup", "check", "--json", "--offline"],
                               check=False).stdout)
    checks = checks["checks"] if isinstance(checks, dict) else checks
    in_use = next(c for c in checks if c["id"] == "agent-in-use")
    assert "Microsoft's defender-iot-micro-agent 4.1.2" in in_use["message"], in_use

    # Its unit cannot load sealed files: refused, nothing written.
    sealed = ct.run(["defender-setup", "apply", "--seal", "--connection-string-file", "-"],
                    input=preseed.connection_string(device="dev2"), check=False)
    assert sealed.returncode != 0 and "reads plain files only" in sealed.stdout + sealed.stderr
    assert "DeviceId=dev1" in connection_string(ct)

    # An identity the agent cannot use: the same verdict as ours (active, same process),
    # then the previous set back and the agent healthy again.
    refused = ct.run(["defender-setup", "apply", "--connection-string-file", "-"],
                     input=preseed.connection_string(device="refused1"), check=False,
                     timeout=120)
    out = refused.stdout + refused.stderr
    assert "VERIFICATION FAILED" in out and "rolled back to the previous credentials" in out
    assert "DeviceId=dev1" in connection_string(ct)
    assert ct.show(UNIT, "ActiveState")["ActiveState"] == "active"

    # conf.json changed: the cache goes before the one restart, and is rebuilt from it.
    assert ct.read(CACHE).strip() == "{}"
    conf = '{"IothubModule_TransportProtocol": "MQTT_WebSocket_Protocol"}\n'
    ct.copy_in(conf, f"{MS_DIR}/conf.json", mode=0o600)
    out = ct.run(["defender-setup", "restart"]).stdout
    assert f"deleted {CACHE}" in out and VERDICT in out, out
    assert ct.read(CACHE) == conf
    again = ct.run(["defender-setup", "restart"]).stdout  # unchanged: the cache stays
    assert "deleted" not in again and VERDICT in again, again

    # debconf: another identity, one restart.
    cursor = journal_cursor(ct)
    before = ct.show(UNIT, "InvocationID")["InvocationID"]
    out = reconfigure(ct, preseed.for_connection_string(
        preseed.connection_string(device="dev2"))).stderr
    after = ct.show(UNIT, "InvocationID")["InvocationID"]
    assert VERDICT in out, out
    assert starts_since(ct, cursor) == [after] != [before]
    assert "DeviceId=dev2" in connection_string(ct)

    out = ct.run(["defender-setup", "rollback"]).stdout
    assert VERDICT in out and "DeviceId=dev1" in connection_string(ct), out
    unit_runs_as_shipped(ct)

    # Purge ours: Microsoft's agent keeps its files and keeps running; our state goes.
    ct.run(["apt-get", "purge", "-y", "defender-setup"],
           env={"DEBIAN_FRONTEND": "noninteractive"})
    assert "DeviceId=dev1" in connection_string(ct)
    assert not ct.exists(f"{MS_DIR}/.defender-setup")
    assert ct.show(UNIT, "ActiveState")["ActiveState"] == "active"
