"""``status --json`` and ``check --json`` against their versioned fields (defender_setup/schema.py).

The real documents of both commands, for each method and the states that add fields (an
import written and one refused, the service asked), must hold exactly the fields of the last
version: a field added, removed or renamed without a new line in the schema fails here.
"""

import json

import pytest

from defender_setup import schema
from defender_setup.service import Service
from defender_setup.status import collect
from tests.clirun import Run
from tests.fakes import FakeSystemd, running
from tests.hubsim.zerotouch import Stand
from tests.offers import CRED, CS, NAMES, sas

GROUP_KEY = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
HOW = ("append one line with the next version to schema.{} (and list the fields in the "
       "README): fleet tools parse these documents")


def documents(run: Run, label: str, out: dict) -> None:
    for command, history in (("status", schema.STATUS_HISTORY), ("check", schema.CHECK_HISTORY)):
        argv = [command, "--json"] + (["--offline"] if command == "check" else [])
        _, text, _ = run(*argv)
        out[f"{command} ({label})"] = (json.loads(text), history)


@pytest.fixture
def seen(root, tmp_path, capsys, monkeypatch, sas_inputs, cert_inputs):
    """Every document, by "command (state)"."""
    run = Run(root, tmp_path, capsys, monkeypatch)
    docs: dict = {}
    documents(run, "not configured", docs)
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    documents(run, "connection-string", docs)
    assert run("apply", "--no-restart", *run.inputs(cert_inputs))[0] == 0
    documents(run, "certificate", docs)
    offer = root / CRED / NAMES[CS]
    offer.parent.mkdir(parents=True)
    offer.write_bytes(sas(seed=7))
    assert run("import", "--no-restart")[0] == 0
    documents(run, "imported", docs)
    offer.write_bytes(b"HostName=x")
    assert run("import", "--no-restart")[0] == 65
    documents(run, "import refused", docs)
    with Stand(tmp_path / "stand") as stand:  # a device that provisioned itself through DPS
        stand.dps.group("fleet", GROUP_KEY, "127.0.0.1")
        stand.conf(root)
        assert run("provision", "--id-scope", "0ne00000A0A", "--endpoint", stand.endpoint,
                   "--registration-id", "dev-1", "--no-restart", "--group-key-file", "-",
                   stdin=GROUP_KEY.encode())[0] == 0
        documents(run, "dps", docs)
    # The service's fields come from systemd: asked here through the fake systemctl
    # (--root never asks the host's systemd), in a tree that looks booted.
    (root / "run/systemd/system").mkdir(parents=True)
    FakeSystemd(tmp_path, [dict(running(status="connected to hub"), LoadState="loaded")],
                [{}]).path_env(monkeypatch)
    state = Service(root, environ={}, manages_root=True).state()
    docs["status (service asked)"] = (schema.status_document(collect(root, state)),
                                      schema.STATUS_HISTORY)
    return docs


@pytest.mark.allow_subprocess("systemctl")
def test_status_and_check_json_hold_exactly_the_fields_of_their_version(seen):
    union = {"status": set(), "check": set()}
    for name, (doc, history) in seen.items():
        command = name.split()[0]
        which = "STATUS_HISTORY" if command == "status" else "CHECK_HISTORY"
        assert doc[schema.SCHEMA_VERSION] == schema.version(history), name
        found = schema.paths(doc, history)
        extra = found - schema.fields(history)
        assert not extra, f"{name}: new fields {sorted(extra)}: {HOW.format(which)}"
        union[command] |= found
    for command, history, which in (("status", schema.STATUS_HISTORY, "STATUS_HISTORY"),
                                    ("check", schema.CHECK_HISTORY, "CHECK_HISTORY")):
        gone = schema.fields(history) - union[command]
        assert not gone, (f"{command}: fields no longer in any document {sorted(gone)}: "
                          f"{HOW.format(which)}")


@pytest.mark.allow_subprocess("systemctl")
def test_check_json_lists_its_checks_under_checks(seen):
    doc, _ = seen["check (certificate)"]
    assert list(doc) == ["schemaVersion", "checks"]
    ids = [c["id"] for c in doc["checks"]]
    assert "certificate-expiry" in ids and "hub-auth" in ids
    assert {c["status"] for c in doc["checks"]} <= {"ok", "warning", "error", "skipped"}
