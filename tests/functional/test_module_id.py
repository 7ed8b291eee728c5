"""A ModuleId other than DefenderIotMicroAgent is a warning naming the expected id, never an
error, whichever way the credentials come in: ``validate``, ``apply`` and the boot-time
``import`` here (real command line, throw-away root), debconf in test_debconf_bridge.py."""

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.credentials import CONNECTION_STRING_FILE
from tests.clirun import Run
from tests.conftest import DEVICE, HUB
from tests.offers import CRED, CS, NAMES

MIS_CASED = "DefenderIoTMicroAgent"  # as one of Microsoft's own tutorials spells it
CASE_WARNING = (f"warning: ModuleId '{MIS_CASED}' differs from the expected "
                "DefenderIotMicroAgent only in letter case: IDs are case-sensitive, so the hub "
                "knows it as another module; use DefenderIotMicroAgent unless you created this "
                "one on purpose")
OTHER_WARNING = ("warning: ModuleId 'Telemetry' is not the expected DefenderIotMicroAgent, the "
                 "micro agent's module identity; keep it only if this module exists on the "
                 "hub on purpose")


def text(module: str) -> bytes:
    return (f"HostName={HUB};DeviceId={DEVICE};ModuleId={module};"
            "SharedAccessKey=bW9kdWxlLWlkLXRlc3Qta2V5LTAxMjM0NTY3ODlhYg==").encode()


@pytest.fixture
def run(root, tmp_path, capsys, monkeypatch):
    return Run(root, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("module,warning", [(MIS_CASED, CASE_WARNING),
                                            ("Telemetry", OTHER_WARNING)])
def test_validate_and_apply_warn_and_succeed(run, module, warning):
    path = run.file("cs.txt", text(module))
    code, out, err = run("validate", "--connection-string-file", path)
    assert (code, err) == (0, "") and f"\n{warning}\n" in out
    assert f"valid: connection-string credentials for {DEVICE}/{module}" in out
    code, out, err = run("apply", "--no-restart", "--connection-string-file", path)
    assert (code, err) == (0, "") and f"\n{warning}\n" in out
    assert f"ModuleId={module};".encode() in AgentDir(run.root).current()[CONNECTION_STRING_FILE]
    # and status/check keep saying so about the stored set
    assert f"\n{warning}\n" in run("status")[1]
    assert "[warn] credentials-warnings" in run("check", "--offline")[1]


def test_the_expected_module_id_is_not_warned_about(run):
    path = run.file("cs.txt", text("DefenderIotMicroAgent"))
    code, out, _ = run("apply", "--no-restart", "--connection-string-file", path)
    assert code == 0 and "warning" not in out


def test_the_boot_time_import_warns_and_imports(run):
    offer = run.root / CRED / NAMES[CS]
    offer.parent.mkdir(parents=True)
    offer.write_bytes(text(MIS_CASED))
    code, out, err = run("import", "--no-restart")
    assert code == 0, err
    assert f"{CASE_WARNING}\n" in out and f"imported connection-string credentials for {DEVICE}/" \
        f"{MIS_CASED}" in out
