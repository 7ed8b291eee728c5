"""defender_setup.debconf_bridge: the pure resolve step, then the real debconf protocol.

The protocol tests run real debconf (a private database through DEBCONF_SYSTEMRC, the real
templates, the shell confmodule, the noninteractive frontend): no mock of debconf.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from defender_setup.credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE
from defender_setup.debconf_bridge import Answers, question_for, resolve
from defender_setup.errors import (
    AUTH_METHOD,
    CERTIFICATE,
    CONNECTION_STRING,
    DEVICE_ID,
    PRIVATE_KEY,
    InputError,
    ValidationError,
)
from defender_setup.provision import NOTHING_STORED, Request, plan
from tests.offers import ANSWER_CS as CS
from tests.offers import ANSWER_KEY as KEY

REPO = Path(__file__).resolve().parents[2]
X509 = b"HostName=hub.azure-devices.net;DeviceId=dev1;ModuleId=DefenderIotMicroAgent;x509=true\n"


def st(files: dict):
    """A stored set of plain files, as provision.read sees it."""
    from dataclasses import replace

    return replace(NOTHING_STORED, files=files, plain=files)


def no_read(path, what):
    raise AssertionError(f"unexpected read of {path}")


# -- resolve (pure) ------------------------------------------------------------------------
def test_later_keeps_everything():
    assert resolve(Answers(method="later"), st({CONNECTION_STRING_FILE: b"x"}), no_read) is None


def test_connection_string_is_passed_through():
    inputs = resolve(Answers(method="connection-string", connection_string=CS), st({}), no_read)
    assert inputs == Request(CS.encode(), method="connection-string", origin="debconf", probe=True)
    assert KEY not in repr(inputs) and KEY not in repr(Answers(connection_string=CS))


def test_empty_secret_keeps_same_method():
    current = {CONNECTION_STRING_FILE: CS.encode()}
    assert resolve(Answers(method="connection-string"), st(current), no_read) == \
        Request(CS.encode(), method="connection-string", origin="debconf", probe=True)


def test_empty_secret_without_credentials_is_an_error():
    with pytest.raises(ValidationError) as err:
        resolve(Answers(method="connection-string"), st({}), no_read)
    assert question_for(err.value, Answers(method="connection-string")) == "connection-string"


def test_empty_secret_when_switching_method_is_an_error():
    current = {CONNECTION_STRING_FILE: X509, CERTIFICATE_FILE: b"c", PRIVATE_KEY_FILE: b"k"}
    with pytest.raises(ValidationError):
        resolve(Answers(method="connection-string"), st(current), no_read)


def test_certificate_from_identity_answers_and_files():
    files = {"/c.pem": b"CERT", "/k.pem": b"KEY"}
    answers = Answers(method="certificate", hub_hostname="hub.azure-devices.net",
                      device_id="dev1", certificate_file="/c.pem", private_key_file="/k.pem")
    inputs = resolve(answers, st({}), lambda path, what: files[path])
    assert inputs.connection_string == X509.strip()
    assert (inputs.certificate, inputs.private_key) == (b"CERT", b"KEY")


def test_certificate_keeps_current_files_when_paths_are_empty():
    current = {CONNECTION_STRING_FILE: X509, CERTIFICATE_FILE: b"C", PRIVATE_KEY_FILE: b"K"}
    inputs = resolve(Answers(method="certificate"), st(current), no_read)
    assert inputs == Request(X509, b"C", b"K", method="certificate", origin="debconf", probe=True)


def test_certificate_without_files_names_the_question():
    answers = Answers(method="certificate", hub_hostname="h.azure-devices.net", device_id="d")
    with pytest.raises(ValidationError) as err:  # the plan names the missing file
        plan(resolve(answers, st({}), no_read), st({}))
    assert question_for(err.value, answers) == "certificate-file"


@pytest.mark.parametrize("device", ["dev1;SharedAccessKey=x", "dev 1", "dév1", ""])
def test_identity_answers_cannot_inject_keys(device):
    answers = Answers(method="certificate", hub_hostname="h.azure-devices.net",
                      device_id=device, certificate_file="/c", private_key_file="/k")
    with pytest.raises(ValidationError) as err:
        resolve(answers, st({}), lambda path, what: b"x")
    assert question_for(err.value, answers) == "device-id"


def test_relative_path_is_refused(tmp_path):
    from defender_setup.debconf_bridge import read_input

    with pytest.raises(InputError, match="absolute"):
        read_input("device.pem", CERTIFICATE)
    with pytest.raises(InputError, match="does not exist"):
        read_input(str(tmp_path / "missing.pem"), CERTIFICATE)


def test_file_answers_are_bounded_and_regular_files_only(tmp_path):
    from defender_setup.debconf_bridge import read_input

    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        answers = Answers(method="certificate", hub_hostname="h.azure-devices.net",
                          device_id="d", certificate_file=path, private_key_file="/dev/null")
        with pytest.raises(InputError) as err:
            resolve(answers, st({}), read_input)
        assert "not a regular file" in str(err.value)
        assert question_for(err.value, answers) == "certificate-file"
    (tmp_path / "big.key").write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(ValidationError, match="at most 64 KiB") as err:
        read_input(str(tmp_path / "big.key"), PRIVATE_KEY)
    assert question_for(err.value, Answers(method="certificate")) == "private-key-file"


# -- routing: by the error's field, never by its wording ---------------------------------------
CERT_PARTS = Answers(method="certificate", hub_hostname="h.azure-devices.net", device_id="d")
CERT_CS = Answers(method="certificate", connection_string="HostName=...;x509=true")


@pytest.mark.parametrize("field, part, answers, question", [
    (AUTH_METHOD, None, Answers(method="certificate-ish"), "auth-method"),
    (CONNECTION_STRING, None, Answers(method="connection-string"), "connection-string"),
    (CONNECTION_STRING, "SharedAccessKey", Answers(method="connection-string"),
     "connection-string"),
    (CONNECTION_STRING, "DeviceId", Answers(method="connection-string"), "connection-string"),
    (CONNECTION_STRING, "DeviceId", CERT_CS, "connection-string"),
    (CONNECTION_STRING, "DeviceId", CERT_PARTS, "device-id"),
    (CONNECTION_STRING, "HostName", CERT_PARTS, "hub-hostname"),
    (CONNECTION_STRING, "ModuleId", CERT_PARTS, "module-id"),
    (DEVICE_ID, None, CERT_PARTS, "device-id"),
    (CERTIFICATE, None, CERT_PARTS, "certificate-file"),
    (PRIVATE_KEY, "certificate", CERT_CS, "private-key-file"),  # the part is shown only
    (None, None, Answers(method="connection-string"), "connection-string"),
    (None, None, CERT_PARTS, "auth-method"),
])
def test_errors_are_routed_by_their_field(field, part, answers, question):
    from defender_setup.errors import SetupError

    # The wording points elsewhere on purpose: only the field may decide.
    error = SetupError("the certificate, the private key, the device and the module", field,
                       part)
    assert question_for(error, answers) == question


def test_an_invalid_preseeded_method_goes_back_to_the_method():
    answers = Answers(method="certificate-file", certificate_file="/c")
    with pytest.raises(ValidationError) as err:
        resolve(answers, st({}), no_read)
    assert question_for(err.value, answers) == "auth-method"


def test_helper_is_pinned_to_debians_python():
    helper = REPO / "debian" / "helper" / "debconf-helper"
    assert helper.read_text().startswith("#!/usr/bin/python3 -I\n")
    assert os.access(helper, os.X_OK)


def test_current_gives_defaults_and_never_a_secret(tmp_path, capsys):
    """debconf-helper current: the config script's defaults; a sealed connection string is
    not decrypted for them, and an unsafe directory gives none (exit 77)."""
    from defender_setup.debconf_bridge import main

    agent = tmp_path / "var" / "defender_iot_micro_agent"
    agent.mkdir(parents=True, mode=0o700)
    (agent / CONNECTION_STRING_FILE).write_text(CS + "\n")
    assert main(["current", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == ("method\tconnection-string\nsealed\tfalse\nHostName\thub.azure-devices.net\n"
                   "DeviceId\tdev1\nModuleId\tDefenderIotMicroAgent\n")
    assert KEY not in out

    (agent / CONNECTION_STRING_FILE).rename(agent / (CONNECTION_STRING_FILE + ".cred"))
    assert main(["current", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "method\tconnection-string\nsealed\ttrue\n"

    agent.rename(tmp_path / "elsewhere")  # a link where the directory should be
    agent.symlink_to(tmp_path / "elsewhere")
    assert main(["current", "--root", str(tmp_path)]) == 77
    assert capsys.readouterr().out == ""
