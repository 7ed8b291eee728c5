"""Every way in, the same semantics: each case in tests/golden/<case>/case.json runs through
every adapter of the provisioning core (``apply``, the boot-time ``import``, the debconf
bridge as the config script and the postinst run it, then the trigger's ``restart``).

A case names the stored set before (``current``/``previous``: set names), the request, what
the agent does with the new set (a fake systemctl: ``accepts`` or ``refuses``), and, per
adapter, the exit code, the restarts and the hub probes (CONNECTs counted by a real test hub
on loopback), then the stored generations after. Sets: ``A`` the identity the test hub knows,
``B`` the same identity with a key it refuses, ``malformed`` not a connection string.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from defender_setup import cli
from defender_setup.agentdir import PREVIOUS, STATE, AgentDir
from defender_setup.credentials import CONNECTION_STRING_FILE, validate
from defender_setup.errors import SetupError
from defender_setup.importer import run as import_run
from defender_setup.sealing import PENDING, open_set
from defender_setup.service import Service
from tests.fakes import FakeClock, FakeCreds, FakeJournal, FakeSystemd, failed, running, seal_set
from tests.functional.test_debconf_bridge import DEBCONF, _seed, debconf, dpkg_root  # noqa: F401
from tests.hubroot import KEY, WRONG_KEY, configure, sas_hub, sas_text

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.json").exists())
ADAPTERS = ("apply", "import", "debconf")
SETS = {"A": sas_text(KEY), "B": sas_text(WRONG_KEY), "malformed": b"HostName=;;oops"}
# What is stored is the canonical form of a set (its keys in the documented order).
NAME_OF = {validate("connection-string", SETS[n]).files[CONNECTION_STRING_FILE][0]: n
           for n in ("A", "B")}
CREDENTIAL = "run/credentials/@system/defender-setup.connection-string"
CS_SEALED = CONNECTION_STRING_FILE + ".cred"

pytestmark = pytest.mark.allow_subprocess("systemctl", "policy-rc.d", "systemd-creds",
                                          *DEBCONF)


def generation(directory: Path) -> str | None:
    """Which set a generation holds (a sealed one decrypted by the fake systemd-creds)."""
    path, sealed = directory / CONNECTION_STRING_FILE, directory / CS_SEALED
    if sealed.exists():
        return NAME_OF.get(open_set({CS_SEALED: sealed.read_bytes()})[0].get(
            CONNECTION_STRING_FILE), "?")
    return NAME_OF.get(path.read_bytes(), "?") if path.exists() else None


def plant(root: Path, before: dict) -> None:
    """The stored generations before: previous first, then current (AgentDir keeps it)."""
    agent = AgentDir(root)
    for name in (before.get("previous"), before.get("current")):
        if name:
            agent.write(validate("connection-string", SETS[name]).files, origin="apply")
    if before.get("previous") and not before.get("current"):
        agent.unconfigure()
    if before.get("sealed"):
        seal_set(root, validate("connection-string", SETS[before["current"]]))


def sealed_or_pending(root: Path) -> bool:
    """Sealed now, or waiting for the first boot to be (a tree that is not the running
    system); and no plain secret left in the previous generation either way."""
    agent = AgentDir(root)
    previous = agent.state / PREVIOUS
    if (previous / CONNECTION_STRING_FILE).exists():
        return False
    return (agent.path / CS_SEALED).exists() or agent.record(PENDING) is not None


@pytest.fixture
def world(hub_pki, dpkg_root, tmp_path, monkeypatch):  # noqa: F811
    """A booted throw-away root wired to the test hub (the probe's peer)."""
    (dpkg_root / "run/systemd/system").mkdir(parents=True)
    hub = sas_hub(hub_pki)
    configure(dpkg_root, hub_pki, port=hub.port)
    yield dpkg_root, hub
    hub.stop()


def systemd_for(case: dict, tmp_path: Path, monkeypatch) -> FakeSystemd:
    plan = [{"states": [running("inv-1")]}] if case["agent"] == "accepts" else \
        [{"states": [failed("inv-1")], "rc": 1}, {"states": [running("inv-2")]}]
    fake = FakeSystemd(tmp_path, [dict(running("inv-0"), LoadState="loaded")], plan)
    fake.path_env(monkeypatch)
    return fake


def service(root: Path) -> Service:
    # The throw-away root stands for the running system (a real --root never reaches systemd).
    return Service(root, environ={}, journal=lambda: FakeJournal(), manages_root=True)


def cli_run(root, argv, capsys) -> tuple[int, str]:
    code = cli.main([*argv, "--root", str(root)], service=service(root))
    out, err = capsys.readouterr()
    return code, out + err


def via_apply(case, root, tmp_path, capsys, monkeypatch, debconf) -> tuple[int, str]:  # noqa: F811
    path = tmp_path / "request.txt"
    path.write_bytes(SETS[case["request"]])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    probe = ["--probe"] if case.get("probe", True) else []
    return cli_run(root, ["apply", "--connection-string-file", str(path), *probe], capsys)


def via_import(case, root, tmp_path, capsys, monkeypatch, debconf) -> tuple[int, str]:  # noqa: F811
    offered = root / CREDENTIAL
    offered.parent.mkdir(parents=True, exist_ok=True)
    offered.write_bytes(SETS[case["request"]])
    out, clock = io.StringIO(), FakeClock()
    try:
        code = import_run(root, "manual", timeout=30, out=out, environ={},
                          service=service(root), clock=clock, sleep=clock.sleep)
    except SetupError as exc:
        out.write(f"error: {exc}\n")
        code = exc.exit_code
    return code, out.getvalue()


def via_debconf(case, root, tmp_path, capsys, monkeypatch, debconf) -> tuple[int, str]:  # noqa: F811
    """What one dpkg run does: the config script's check, the postinst's apply, then (when
    configured) the trigger's restart."""
    probe = "true" if case.get("probe", True) else "false"
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password",
                           SETS[case["request"]].decode()),
                     _seed("probe-hub", "boolean", probe)])
    checked = debconf.helper("check", "--root", str(root))
    applied = debconf.helper("apply", "--root", str(root))
    said = checked.stdout + applied.stderr
    if applied.returncode != 0:
        return applied.returncode, said
    if AgentDir(root).method() is None:
        return applied.returncode, said
    code, out = cli_run(root, ["restart"], capsys)
    return code, said + out


VIA = {"apply": via_apply, "import": via_import, "debconf": via_debconf}


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("name", CASES)
def test_golden_case(name, adapter, world, debconf, tmp_path, capsys,  # noqa: F811
                     monkeypatch):
    case = json.loads((GOLDEN / name / "case.json").read_text())
    root, hub = world
    if case["before"].get("sealed"):
        FakeCreds(tmp_path).path_env(monkeypatch)
    plant(root, case["before"])
    fake = systemd_for(case, tmp_path, monkeypatch)
    connects = len(hub.connections)

    code, said = VIA[adapter](case, root, tmp_path, capsys, monkeypatch, debconf)

    after = case.get(f"after_{adapter}", case["after"])
    agent = AgentDir(root)
    assert code == case["exit"][adapter], said
    assert generation(agent.path) == after.get("current"), said
    assert generation(agent.path / STATE / PREVIOUS) == after.get("previous"), said
    assert len(fake.restarts()) == case["restarts"][adapter], said
    assert len(hub.connections) - connects == case["probes"][adapter], said
    assert case["says"] in said, said
    if after.get("sealed"):
        assert sealed_or_pending(root), said
    assert KEY not in said and WRONG_KEY not in said


def test_the_import_record_holds_no_digest_of_the_set(world, tmp_path, capsys, monkeypatch):
    """status --json shows import.json: what identifies a refused offer is kept apart."""
    root, _ = world
    for agent in ("accepts", "refuses"):
        plant(root, {"current": "A"})
        (tmp_path / agent).mkdir()
        systemd_for({"agent": agent}, tmp_path / agent, monkeypatch)
        via_import({"request": "B"}, root, tmp_path, capsys, monkeypatch, None)
        record = AgentDir(root).record("import.json")
        assert record["result"] == ("verified" if agent == "accepts" else "rejected")
        assert "digest" not in json.dumps(record)
