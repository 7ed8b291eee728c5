"""defender_setup.importer: validate an offered set, write it once, verify it, go back if refused.

The pure part (check_offer) is tested with offers built in memory; run() works on a
throw-away root with real files and a fake systemctl first on PATH (tests/fakes.py)
and a fake clock, so the verdicts cost no time.
"""

import base64
import io
import os

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.errors import SetupError, ValidationError
from defender_setup.importer import PENDING, RECORD, check_offer, last_import, run
from defender_setup.offer import REJECTED_NOTE, Offer
from defender_setup.service import Service
from tests import certfactory
from tests.conftest import DEVICE, HUB, MODULE, snapshot
from tests.fakes import FakeClock, FakeJournal, FakeSystemd, failed, running

CS, CERT, KEY = "connection_string.txt", "certificate_public.pem", "certificate_private.pem"
CRED = "run/credentials/@system"
NAMES = {CS: "defender-setup.connection-string", CERT: "defender-setup.certificate",
         KEY: "defender-setup.private-key"}


def sas(seed=1, device=DEVICE) -> bytes:
    key = base64.b64encode(bytes((seed + i) % 256 for i in range(32))).decode()
    return f"HostName={HUB};DeviceId={device};ModuleId={MODULE};SharedAccessKey={key}".encode()


def key_of(text: bytes) -> str:
    return text.decode().split("SharedAccessKey=")[1]


X509 = f"HostName={HUB};DeviceId={DEVICE};ModuleId={MODULE};x509=true".encode()


def credential_offer(**files) -> Offer:
    return Offer("credential", files, {n: f"/run/credentials/@system/{NAMES[n]}" for n in files})


def offered(cs=None, cert=None, key=None) -> Offer:
    files = {CS: cs, CERT: cert, KEY: key}
    return credential_offer(**{n: d for n, d in files.items() if d is not None})


@pytest.fixture(scope="module")
def ident():
    return certfactory.make_identity(cn=DEVICE, key="p256")


# -- check_offer: the pure part ----------------------------------------------------------
def test_sas_credential_is_the_connection_string_method():
    v = check_offer(offered(sas()), {})
    assert v.method == "connection-string" and set(v.files) == {CS}


def test_certificate_set(ident):
    v = check_offer(offered(X509, ident.cert_pem, ident.key_pem), {})
    assert v.method == "certificate" and set(v.files) == {CS, CERT, KEY}


def test_a_new_certificate_alone_rekeys_a_certificate_device(ident):
    current = check_offer(offered(X509, ident.cert_pem, ident.key_pem), {}).files
    current = {n: d for n, (d, _m) in current.items()}
    other = certfactory.make_identity(cn=DEVICE, key="p256")
    v = check_offer(offered(cert=other.cert_pem, key=other.key_pem), current)
    assert v.files[CERT][0] != current[CERT] and v.files[CS][0] == current[CS]


def error_of(offer, current=None) -> str:
    with pytest.raises(ValidationError) as caught:
        check_offer(offer, current or {})
    return str(caught.value)


def test_bad_input_names_the_credential_the_field_and_the_fix(ident):
    encrypted = certfactory.encrypted_pem(certfactory.private_key("p256", 5))
    cases = {
        "empty": (offered(b""), "credential defender-setup.connection-string: connection "
                  "string: is empty"),
        "garbage": (offered(b"\x00garbage;;"), "credential defender-setup.connection-string: "),
        "bad key": (offered(sas().replace(b"SharedAccessKey=", b"SharedAccessKey=%")),
                    "credential defender-setup.connection-string: SharedAccessKey: is not "
                    "valid base64"),
        "encrypted key": (offered(X509, ident.cert_pem, encrypted),
                          "credential defender-setup.private-key: "),
        "cert without key": (offered(X509, ident.cert_pem),
                             "credential defender-setup.private-key: is missing: a "
                             "certificate was offered without its private key"),
        "key without cert": (offered(X509, key=ident.key_pem),
                             "credential defender-setup.certificate: is missing"),
        "x509 without files": (offered(X509), "credential defender-setup.certificate: is "
                               "missing: the connection string says x509=true"),
        "sas with a certificate": (offered(sas(), ident.cert_pem, ident.key_pem),
                                   "credential defender-setup.connection-string: "
                                   "authentication method: the connection string uses "
                                   "SharedAccessKey but credential defender-setup.certificate"),
        "certificate alone, SAS device": (offered(cert=ident.cert_pem, key=ident.key_pem),
                                          "credential defender-setup.connection-string: is "
                                          "missing"),
        "swapped": (offered(X509, ident.key_pem, ident.cert_pem),
                    "credential defender-setup.certificate: "),
    }
    for name, (offer, start) in cases.items():
        message = error_of(offer)
        assert message.startswith(start), (name, message)
        assert "\n" not in message, name
        assert "BEGIN" not in message and key_of(sas()) not in message, name
    assert "encrypted" in error_of(cases["encrypted key"][0])


def test_drop_folder_errors_name_the_file(tmp_path):
    offer = Offer("drop-folder", {CS: b"nonsense"}, {CS: str(tmp_path / CS)}, folder=tmp_path)
    assert error_of(offer).startswith(f"{tmp_path / CS}: connection string:")


# -- run(): files, records and systemctl ---------------------------------------------------
@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "run/systemd/system").mkdir(parents=True)
    return r


def offer_credential(root, name, data: bytes):
    path = root / CRED / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Importer:
    def __init__(self, root, tmp_path, monkeypatch, states=None, restart_plan=None):
        self.root = root
        self.fake = FakeSystemd(tmp_path, states or [dict(running(), LoadState="loaded")],
                                restart_plan or [{}])
        self.fake.path_env(monkeypatch)

    def __call__(self, mode="no-restart"):
        out, clock = io.StringIO(), FakeClock()
        svc = Service(self.root, environ={}, journal=lambda: FakeJournal(), manages_root=True)
        try:
            code = run(self.root, mode, timeout=30, out=out, environ={}, service=svc,
                       clock=clock, sleep=clock.sleep)
        except SetupError as exc:
            out.write(f"error: {exc}\n")
            code = exc.exit_code
        return code, out.getvalue()


@pytest.fixture
def importer(root, tmp_path, monkeypatch):
    return Importer(root, tmp_path, monkeypatch)


pytestmark = pytest.mark.allow_subprocess("systemctl")  # the fake systemctl is a process


def test_nothing_offered_does_nothing(root, importer):
    code, out = importer("boot")
    assert code == 0 and "nothing offered" in out
    assert not (root / "var").exists() and importer.fake.calls() == []


def test_new_credential_is_written_with_its_origin_and_recorded(root, importer):
    offer_credential(root, NAMES[CS], sas())
    code, out = importer("no-restart")
    assert code == 0, out
    agent = AgentDir(root)
    assert key_of(sas()).encode() in agent.current()[CS]
    assert agent.origin()["source"] == "credential"
    record = last_import(root)
    assert record["result"] == "written" and record["source"] == "credential"
    assert record["identity"] == {"method": "connection-string", "hub": HUB,
                                  "device": DEVICE, "module": MODULE}
    assert record["from"] == {CS: str(root / CRED / NAMES[CS])}
    assert key_of(sas()) not in out + str(record)


def test_equal_set_writes_and_restarts_nothing(root, importer):
    offer_credential(root, NAMES[CS], sas())
    importer("no-restart")
    before = snapshot(root / "var")
    offer_credential(root, NAMES[CS], b"\xef\xbb\xbf  " + sas() + b"\r\n")  # same, as pasted
    code, out = importer("boot")
    assert code == 0 and "nothing written, nothing restarted" in out
    assert snapshot(root / "var") == before  # not even the record
    assert importer.fake.calls() == []


def test_invalid_credential_changes_nothing_and_is_recorded(root, importer):
    offer_credential(root, NAMES[CS], sas(1))
    importer("no-restart")
    files_before = AgentDir(root).current()
    wrong = sas(2).replace(b"SharedAccessKey=", b"SharedAccessKey=!")
    offer_credential(root, NAMES[CS], wrong)
    code, out = importer("boot")
    assert code == 65
    assert out.count("\n") == 1 and "credential defender-setup.connection-string: " \
        "SharedAccessKey: is not valid base64" in out and "nothing was changed" in out
    assert AgentDir(root).current() == files_before and importer.fake.calls() == []
    record = last_import(root)
    assert record["result"] == "invalid" and "SharedAccessKey" in record["message"]
    assert key_of(wrong)[1:] not in out + str(record)


def test_boot_mode_queues_the_restart_and_never_waits_for_it(root, importer):
    offer_credential(root, NAMES[CS], sas())
    code, out = importer("boot")
    assert code == 0, out
    calls = importer.fake.calls()
    assert "--no-block restart defender-iot-micro-agent.service" in calls
    assert not any(c.startswith("restart") for c in calls)  # a synchronous restart deadlocks
    assert AgentDir(root).record(PENDING) is not None
    assert "defender-setup-import-verify.service verifies" in out


def test_boot_verify_without_a_pending_import_does_nothing(root, importer):
    assert importer("boot-verify") == (0, "")
    assert importer.fake.calls() == []


def test_boot_verify_keeps_a_healthy_set_and_clears_the_drop_folder(root, importer):
    folder = root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(sas())
    assert importer("boot")[0] == 0
    assert (folder / CS).exists()  # kept until the agent has accepted it
    code, out = importer("boot-verify")
    assert code == 0, out
    assert "active (running), stable for" in out
    assert not (folder / CS).exists() and "removed connection_string.txt" in out
    assert last_import(root)["result"] == "verified"
    assert AgentDir(root).record(PENDING) is None
    assert not any(c.startswith("restart") for c in importer.fake.calls())  # watched only


def test_boot_verify_rolls_back_a_refused_set(root, tmp_path, monkeypatch):
    offer_credential(root, NAMES[CS], sas(1))
    (tmp_path / "a").mkdir()
    Importer(root, tmp_path / "a", monkeypatch)("no-restart")
    offer_credential(root, NAMES[CS], sas(2))
    (tmp_path / "b").mkdir()
    imp = Importer(root, tmp_path / "b", monkeypatch,
                   states=[dict(failed(status=76), LoadState="loaded")],
                   restart_plan=[{"states": [dict(running(inv="inv-3"), LoadState="loaded")]}])
    assert imp("boot")[0] == 0
    code, out = imp("boot-verify")
    assert code == 69, out
    assert "VERIFICATION FAILED" in out and "rolled back to the previous credentials" in out
    assert key_of(sas(1)).encode() in AgentDir(root).current()[CS]
    assert len(imp.fake.restarts()) == 1  # the roll-back's one restart
    assert last_import(root)["result"] == "rejected"
    assert key_of(sas(2)) not in out


def test_a_refused_first_set_leaves_the_device_unconfigured(root, importer, monkeypatch,
                                                            tmp_path):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(sas(3))
    (tmp_path / "c").mkdir()
    imp = Importer(root, tmp_path / "c", monkeypatch,
                   states=[dict(failed(status=76), LoadState="loaded")])
    assert imp("boot")[0] == 0
    code, out = imp("boot-verify")
    assert code == 69, out
    assert AgentDir(root).current() == {}
    assert "reset-failed defender-iot-micro-agent.service" in imp.fake.calls()
    assert imp.fake.restarts() == []
    note = (folder / REJECTED_NOTE).read_text()
    assert "refused" in note and key_of(sas(3)) not in note
    assert (folder / CS).exists()  # a rejected set stays where it was put


def test_invalid_drop_folder_gets_a_note_and_keeps_its_files(root, importer):
    folder = root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(X509)
    code, out = importer("boot")
    assert code == 65
    assert f"{folder / CERT}: is missing" in out
    assert (folder / CS).exists() and "is missing" in (folder / REJECTED_NOTE).read_text()
    assert not (root / "var/defender_iot_micro_agent" / CS).exists()


def test_equal_drop_folder_set_is_removed_from_the_boot_partition(root, importer):
    offer_credential(root, NAMES[CS], sas())
    importer("no-restart")
    os.unlink(root / CRED / NAMES[CS])
    folder = root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).write_bytes(sas())
    code, out = importer("boot")
    assert code == 0 and not (folder / CS).exists(), out


def test_manual_import_restarts_once_and_verifies(root, tmp_path, monkeypatch):
    offer_credential(root, NAMES[CS], sas())
    imp = Importer(root, tmp_path, monkeypatch,
                   restart_plan=[{"states": [dict(running(inv="inv-2"), LoadState="loaded")]}])
    code, out = imp("manual")
    assert code == 0, out
    assert len(imp.fake.restarts()) == 1
    assert last_import(root)["result"] == "verified"


def test_masked_agent_is_not_restarted_nor_rolled_back(root, tmp_path, monkeypatch):
    offer_credential(root, NAMES[CS], sas())
    imp = Importer(root, tmp_path, monkeypatch, states=[{"LoadState": "masked"}])
    code, out = imp("manual")
    assert code == 0 and "is masked" in out
    assert imp.fake.restarts() == [] and AgentDir(root).current()


def test_no_systemd_writes_only(root, importer):
    os.rmdir(root / "run/systemd/system")
    offer_credential(root, NAMES[CS], sas())
    code, out = importer("boot")
    assert code == 0 and "restart skipped: systemd is not running" in out
    assert importer.fake.calls() == [] and AgentDir(root).current()


def test_record_is_private(root, importer):
    offer_credential(root, NAMES[CS], b"")
    importer("boot")
    path = root / "var/defender_iot_micro_agent/.defender-setup" / RECORD
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_status_and_check_show_the_origin_and_the_last_import(root, importer, capsys):
    import json

    from defender_setup import cli

    offer_credential(root, NAMES[CS], sas())
    importer("no-restart")
    offer_credential(root, NAMES[CS], b"HostName=x")
    importer("boot")
    assert cli.main(["status", "--json", "--root", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["origin"]["source"] == "credential"
    assert report["last_import"]["result"] == "invalid"
    assert cli.main(["check", "--json", "--offline", "--root", str(root)]) == 65
    checks = {c["id"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["last-import"]["status"] == "error"
    assert "credential defender-setup.connection-string" in checks["last-import"]["message"]
    assert checks["credentials-valid"]["status"] == "ok"  # the configured set is untouched


def test_an_oversized_credential_is_refused_and_recorded_without_reading_it_all(root, importer):
    offer_credential(root, NAMES[CS], b"HostName=" + b"x" * 2_000_000)
    code, out = importer("boot")
    assert code == 65 and "at most" in out and out.count("\n") == 1
    assert last_import(root)["result"] == "invalid"
    assert not (root / "var/defender_iot_micro_agent" / CS).exists()


def test_a_failed_import_superseded_by_a_later_apply_is_a_warning(root, importer, capsys):
    import json
    import time

    from defender_setup import cli

    offer_credential(root, NAMES[CS], b"garbage")
    assert importer("boot")[0] == 65
    time.sleep(1.1)  # the records have one-second resolution
    AgentDir(root).write(check_offer(offered(sas()), {}).files, origin="apply")
    assert cli.main(["check", "--json", "--offline", "--root", str(root)]) == 0
    check = {c["id"]: c for c in json.loads(capsys.readouterr().out)}["last-import"]
    assert check["status"] == "warning" and "since configured by apply" in check["message"]
