"""defender_setup.cli: commands, exit codes, readable output, nothing lost, nothing leaked."""

import json
import os
import sys

import pytest

from defender_setup import cli
from tests import certfactory
from tests.clirun import Run, agent_path, assert_no_secret, pending_update
from tests.conftest import DEVICE, HUB, MODULE, snapshot
from tests.fakes import debian12


@pytest.fixture
def run(root, tmp_path, capsys, monkeypatch):
    return Run(root, tmp_path, capsys, monkeypatch)


def test_validate_prints_what_it_found_without_the_key(run, sas_inputs):
    code, out, err = run("validate", *run.inputs(sas_inputs, via_stdin=True),
                         stdin=sas_inputs.connection_string)
    assert code == 0
    assert f"hub:           {HUB}" in out and f"device:        {DEVICE}" in out
    assert "valid: connection-string credentials for dev1/DefenderIotMicroAgent" in out
    assert_no_secret(sas_inputs, out, err)
    assert not run.root.exists(), "validate must not write anything"


def test_apply_then_status_shows_identity_thumbprints_and_modes(run, cert_inputs):
    code, out, err = run("apply", "--no-restart", *run.inputs(cert_inputs))
    assert code == 0, err
    thumbprint = cert_inputs.validated().certificate.sha1_thumbprint
    assert f"\n  SHA-1 thumbprint: {thumbprint}\n" in out
    code, out, err = run("status")
    assert code == 0
    assert f"module:          {MODULE}" in out and "method:          certificate" in out
    assert "0600" in out and "SHA-256:" in out
    code, out, _ = run("status", "--json")
    report = json.loads(out)
    assert report["identity"]["device"] == DEVICE
    assert len(report["certificate"]["sha1_thumbprint"]) == 40
    assert_no_secret(cert_inputs, out)


def test_apply_without_no_restart_skips_the_restart_without_systemd(run, sas_inputs):
    code, out, _ = run("apply", *run.inputs(sas_inputs))
    assert code == 0
    assert "skipped" in out and "first boot" in out


def test_method_is_inferred_from_the_inputs(run, cert_inputs):
    args = [a for a in run.inputs(cert_inputs) if a not in ("--method", "certificate")]
    code, out, err = run("validate", *args)
    assert code == 0, err
    assert "method:        certificate" in out


@pytest.mark.parametrize("mangle, field", [
    (lambda t: t.replace(b"HostName", b"Hostname"), "did you mean HostName"),
    (lambda t: t[:-1], "SharedAccessKey: is not valid base64"),
    (lambda t: t.replace(b"dev1", b"d\xe2\x80\x9cev1"), "not plain ASCII"),
])
def test_invalid_connection_string_exits_65_and_changes_nothing(run, sas_inputs, mangle, field):
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    before = snapshot(run.root)
    sas_inputs.connection_string = mangle(sas_inputs.connection_string)
    code, out, err = run("apply", "--no-restart", *run.inputs(sas_inputs))
    assert code == 65
    assert field in err and err.count("\n") == 1
    assert snapshot(run.root) == before
    assert_no_secret(sas_inputs, out, err)


def _other_key_identity():
    good = certfactory.make_identity(cn=DEVICE, key="p256")
    return good.cert_pem, certfactory.key_pem(certfactory.private_key("p256", n=1))


@pytest.mark.parametrize("case, words", [
    ("expired", "expired"),
    ("mismatch", "does not belong to the certificate"),
    ("encrypted", "openssl pkey"),
    ("swapped", "private key"),
])
def test_invalid_certificate_exits_65_and_changes_nothing(run, sas_inputs, cert_inputs, case,
                                                          words):
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    before = snapshot(run.root)
    key = certfactory.private_key("p256")
    if case == "expired":
        cert_inputs.certificate = certfactory.make_identity(cn=DEVICE, key="p256",
                                                            days=-1).cert_pem
    elif case == "mismatch":
        cert_inputs.certificate, cert_inputs.private_key = _other_key_identity()
    elif case == "encrypted":
        cert_inputs.private_key = certfactory.encrypted_pem(key)
    else:
        cert_inputs.certificate, cert_inputs.private_key = \
            cert_inputs.private_key, cert_inputs.certificate
    code, out, err = run("apply", "--no-restart", *run.inputs(cert_inputs))
    assert code == 65, err
    assert words in err
    assert snapshot(run.root) == before
    assert_no_secret(cert_inputs, out, err)


def test_missing_input_file_exits_66(run):
    code, _, err = run("validate", "--connection-string-file", "/nonexistent/cs.txt")
    assert code == 66 and "does not exist" in err


def test_only_one_input_from_stdin(run, cert_inputs):
    code, _, err = run("validate", "--connection-string-file", "-", "--certificate", "-",
                       "--private-key", "/x")
    assert code == 66 and "standard input" in err


def test_symlinked_target_exits_77_and_writes_nothing(run, sas_inputs, tmp_path):
    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    target = run.root / "var/defender_iot_micro_agent/connection_string.txt"
    target.unlink()
    target.symlink_to(tmp_path / "planted")
    before = snapshot(run.root)
    code, _, err = run("apply", "--no-restart", *run.inputs(sas_inputs))
    assert code == 77 and "symbolic link" in err
    assert snapshot(run.root) == before and not (tmp_path / "planted").exists()


def test_rollback_restores_the_previous_method(run, sas_inputs, cert_inputs):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    run("apply", "--no-restart", *run.inputs(cert_inputs))
    code, out, _ = run("rollback", "--no-restart")
    assert code == 0 and "connection_string.txt" in out
    assert "method:          connection-string" in run("status")[1]


def test_rollback_with_nothing_to_restore_exits_66(run):
    code, _, err = run("rollback", "--no-restart")
    assert code == 66 and "no previous set" in err


def test_check_reports_named_checks_and_json(run, sas_inputs):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    code, out, _ = run("check", "--offline")
    assert code == 0 and "[ ok ] credentials-valid" in out
    assert "[skip] hub-auth: the hub accepts the stored identity\n    not run (--offline)" in out
    code, out, _ = run("check", "--json", "--offline")
    checks = json.loads(out)["checks"]
    assert {"agent-dir-safe", "credentials-present", "credentials-valid", "agent-settings",
            "hub-dns", "hub-tcp", "hub-tls", "hub-clock", "hub-auth"} <= {c["id"] for c in checks}
    assert all(set(c) == {"id", "description", "status", "message", "exit_code"}
               for c in checks)


def test_usage_errors_exit_2_and_help_names_every_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("validate", "apply", "restart", "status", "check", "rollback", "65", "77"):
        assert command in out
    for text in ("repair", "75", "--lock-timeout"):
        assert text in out


def test_origin_of_the_set_is_recorded_and_shown(run, sas_inputs, cert_inputs):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    report = json.loads(run("status", "--json")[1])
    assert report["origin"]["source"] == "apply"
    assert report["origin"]["time"].endswith("Z")
    run("apply", "--no-restart", *run.inputs(cert_inputs))
    run("rollback", "--no-restart")
    assert json.loads(run("status", "--json")[1])["origin"]["source"] == "rollback"
    assert "origin:          rollback, " in run("status")[1]


@pytest.mark.parametrize("reader", [["status"], ["status", "--json"], ["check"],
                                    ["check", "--json"]])
def test_readers_report_an_interrupted_update_and_change_nothing(run, sas_inputs, cert_inputs,
                                                                 reader):
    pending_update(run, sas_inputs, cert_inputs)
    before = snapshot(run.root)
    code, out, err = run(*reader)
    assert "interrupted" in out and "defender-setup repair" in out
    assert code == (78 if reader[0] == "check" else 0), err
    assert snapshot(run.root) == before


def test_readers_never_create_anything(run, sas_inputs):
    for reader in (["status"], ["check"], ["status", "--json"]):
        run(*reader)
    assert not run.root.exists()
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    state = agent_path(run) / ".defender-setup"
    (state / "lock").unlink(missing_ok=True)  # as left by an older version
    (state / "staging").mkdir()  # a leftover another writer may be filling right now
    before = snapshot(run.root)
    for reader in (["status"], ["check"]):
        run(*reader)
    assert snapshot(run.root) == before


def test_repair_completes_an_interrupted_update(run, sas_inputs, cert_inputs):
    agent = pending_update(run, sas_inputs, cert_inputs)
    code, out, _ = run("repair")
    assert code == 0 and "repaired" in out
    assert not agent.pending() and agent.method() == "certificate"
    assert agent.current() == {n: d for n, (d, _) in cert_inputs.validated().files.items()}
    before = snapshot(run.root)
    assert run("repair") == (0, "", "")  # nothing pending: nothing touched
    assert snapshot(run.root) == before


def test_repair_creates_nothing_when_unconfigured(run):
    assert run("repair")[0] == 0
    assert not run.root.exists()


@pytest.mark.parametrize("name", ["previous", "staging", "txn"])
def test_a_symlink_in_the_private_state_exits_77_and_readers_report_it(run, sas_inputs, tmp_path,
                                                                       name):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    link = agent_path(run) / ".defender-setup" / name
    if link.is_dir():
        import shutil

        shutil.rmtree(link)
    (tmp_path / "elsewhere").mkdir()
    link.symlink_to(tmp_path / "elsewhere")
    for argv in (["apply", "--no-restart", *run.inputs(sas_inputs)], ["rollback", "--no-restart"],
                 ["restart"]):
        code, _, err = run(*argv)
        assert code == 77 and str(link) in err, (argv, err)
    code, out, _ = run("status", "--json")
    assert code == 0 and str(link) in json.loads(out)["problem"]
    code, out, _ = run("check", "--json")
    safe = next(c for c in json.loads(out)["checks"] if c["id"] == "agent-dir-safe")
    assert code == 77 and safe["status"] == "error" and str(link) in safe["message"]


def test_closed_standard_input_is_one_line_and_66(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed descriptor 0
    code = cli.main(["validate", "--connection-string-file", "-", "--root", str(run.root)])
    err = capsys.readouterr().err
    assert code == 66 and err.count("\n") == 1 and "standard input is closed" in err


def test_status_of_another_root_runs_nothing_from_it_nor_asks_systemd(run, sas_inputs,
                                                                      tmp_path, monkeypatch):
    from tests.fakes import FakeSystemd, running

    run("apply", "--no-restart", *run.inputs(sas_inputs))
    (run.root / "run/systemd/system").mkdir(parents=True)
    policy = run.root / "usr/sbin/policy-rc.d"
    policy.parent.mkdir(parents=True)
    policy.write_text(f"#!/bin/sh\ntouch {tmp_path}/RAN\nexit 0\n")
    policy.chmod(0o755)
    fake = FakeSystemd(tmp_path, [running(status="the host's agent")], [{}])
    fake.path_env(monkeypatch)
    # (check --offline: the hub is not what this is about; its name does not resolve here)
    for argv in (["status"], ["check", "--offline"], ["restart"]):
        code, out, err = run(*argv)
        assert code == 0, (argv, err)
        assert "the host's agent" not in out and "is not /" in out
    code, out, err = run("apply", *run.inputs(sas_inputs))  # the same set: nothing to restart
    assert code == 0 and "unchanged" in out and "the host's agent" not in out, err
    assert fake.calls() == [] and not (tmp_path / "RAN").exists()


# -- bounded inputs, nothing echoed, certificate text escaped -------------------------------
@pytest.mark.parametrize("option", ["--connection-string-file", "--certificate",
                                    "--private-key"])
@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"),
                                        ("/", "a directory")])
def test_non_regular_inputs_exit_66_without_reading(run, option, path, kind):
    args = {"--connection-string-file": "/dev/null", "--certificate": "/dev/null",
            "--private-key": "/dev/null", option: path}
    code, _, err = run("validate", *[x for pair in args.items() for x in pair])
    assert code == 66, err
    assert f"{path} is {kind}, not a regular file" in err and err.count("\n") == 1


def test_a_fifo_as_input_exits_66_without_blocking(run, tmp_path):
    os.mkfifo(tmp_path / "fifo")  # nobody writes: opening it for reading would block
    code, _, err = run("validate", "--connection-string-file", str(tmp_path / "fifo"))
    assert code == 66 and "a FIFO (named pipe)" in err


@pytest.mark.parametrize("size, field, limit", [(1025, "--connection-string-file", "1024 bytes"),
                                                ((1 << 20) + 1, "--certificate", "768 KiB"),
                                                ((64 << 10) + 1, "--private-key", "64 KiB")])
def test_oversized_inputs_exit_65_naming_the_limit(run, cert_inputs, size, field, limit):
    args = run.inputs(cert_inputs)
    args[args.index(field) + 1] = run.file("big", b"\0" * size)
    code, _, err = run("validate", *args)
    assert code == 65 and f"at most {limit}" in err, err


def test_standard_input_is_capped_too(run):
    code, _, err = run("validate", "--connection-string-file", "-", stdin=b"\0" * (1 << 20))
    assert code == 65 and "standard input holds over 1024 bytes" in err


def test_an_empty_private_key_file_is_empty_not_missing(run, cert_inputs):
    args = run.inputs(cert_inputs)
    args[args.index("--private-key") + 1] = "/dev/null"
    code, _, err = run("validate", *args)
    assert code == 65 and "private key: the file is empty" in err, err
    code, _, err = run("validate", *args[2:])  # the method inferred: still the certificate's
    assert code == 65 and "private key: the file is empty" in err, err
    code, _, err = run("validate", "--connection-string-file",
                       run.file("cs", cert_inputs.connection_string), "--private-key", "/dev/null")
    assert code == 65 and "certificate: is missing" in err, err


def test_a_bare_key_is_not_echoed(run):
    token = "TKOxREbXrjk6v8BC2aFKRg"
    text = f"HostName=h.azure-devices.net;DeviceId=d;ModuleId=m;{token}==".encode()
    code, out, err = run("validate", "--connection-string-file", "-", stdin=text)
    assert code == 65 and "part 4 (24 characters) is not a known key" in err
    assert token[:8] not in out + err


def test_certificate_text_is_escaped_in_validate_and_status(run, cert_inputs):
    ident = certfactory.make_identity(cn="dev1\x1b]0;owned\x07\nfake: ok", key="p256")
    cert_inputs.certificate, cert_inputs.private_key = ident.cert_pem, ident.key_pem
    for argv in (("validate", *run.inputs(cert_inputs)),
                 ("apply", "--no-restart", *run.inputs(cert_inputs)), ("status",)):
        code, out, err = run(*argv)
        assert code == 0, err
        assert "\x1b" not in out + err and "\x07" not in out + err
        assert "\nfake: ok" not in out + err and "\\nfake: ok" in out, out


def test_repair_with_nothing_pending_ignores_the_rest(run, sas_inputs, tmp_path):
    run("apply", "--no-restart", *run.inputs(sas_inputs))
    previous = agent_path(run) / ".defender-setup/previous"
    previous.rmdir()  # empty: nothing was configured before
    (tmp_path / "elsewhere").mkdir()
    previous.symlink_to(tmp_path / "elsewhere")
    assert run("repair") == (0, "", "")  # the agent may start on its healthy set
    assert run("check")[0] == 77          # where the planted link is reported


def test_repair_refuses_to_complete_through_a_planted_link(run, sas_inputs, cert_inputs,
                                                           tmp_path):
    agent = pending_update(run, sas_inputs, cert_inputs)
    (tmp_path / "elsewhere").mkdir()
    (agent.state / "previous.new").symlink_to(tmp_path / "elsewhere")
    code, _, err = run("repair")
    assert code == 77 and "previous.new" in err
    assert os.listdir(tmp_path / "elsewhere") == []


# -- sealing ---------------------------------------------------------------------------------
def test_apply_seal_is_refused_without_systemd_creds_and_changes_nothing(run, sas_inputs):
    code, out, err = run("apply", "--seal", "--no-restart", *run.inputs(sas_inputs))
    assert code == 78
    assert err.count("\n") == 1 and "credential sealing: needs systemd 250 or later" in err
    assert not run.root.exists()


def test_apply_seal_in_an_image_tree_is_deferred_to_first_boot(run, sas_inputs):
    debian12(run.root)  # a Debian 12 tree, not the running system
    code, out, _ = run("apply", "--seal", "--no-restart", *run.inputs(sas_inputs))
    assert code == 0 and "sealing deferred to the first boot" in out
    code, out, _ = run("status")
    assert "secrets:         plain files (root-only); sealing deferred to the first boot" in out
    code, out, _ = run("check", "--offline")
    assert code == 0 and "[warn] sealed-credentials" in out
    code, out, _ = run("unseal", "--no-restart")  # changing one's mind cancels it
    assert code == 0
    assert "[skip] sealed-credentials" in run("check", "--offline")[1]


def test_a_sas_string_whose_device_id_holds_x509_is_a_sas_string(run, sas_inputs):
    """The method comes from the connection string's keys, not from a substring of it."""
    text = sas_inputs.connection_string.replace(b"DeviceId=dev1", b"DeviceId=dev-x509=true")
    code, out, err = run("validate", "--connection-string-file", run.file("cs.txt", text))
    assert code == 0 and "valid: connection-string credentials for dev-x509=true/" in out, err


def test_an_unexpected_exception_is_one_line_and_exit_70(capsys):
    import argparse

    from defender_setup.errors import EX_SOFTWARE

    def boom(args, out):
        raise TypeError("the message could quote an input: SECRET")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=boom)
    assert cli.main([], parser=parser) == EX_SOFTWARE
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err and "SECRET" not in err
    assert "internal error: TypeError at" in err and "(boom)" in err


# Every command that takes --timeout (restart and verification) or --lock-timeout.
TIMEOUT_COMMANDS = ("apply", "restart", "rollback", "seal", "unseal", "import")
LOCK_TIMEOUT_COMMANDS = TIMEOUT_COMMANDS + ("status", "check", "repair")


def _parse_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    return exc.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", TIMEOUT_COMMANDS)
@pytest.mark.parametrize("value", ["0", "-1", "4.9", "3601", "nan", "NaN", "inf", "-inf",
                                   "1e999", "", "30s"])
def test_an_out_of_range_timeout_is_a_usage_error_naming_the_range(command, value, capsys):
    # --timeout 0 or -1 used to judge a healthy agent unstable and roll back good credentials.
    # --timeout=VALUE: argparse takes "--timeout -inf" for two options (exit 2 all the same)
    code, line = _parse_error([command, f"--timeout={value}"], capsys)
    assert code == 2
    assert line == (f"defender-setup {command}: error: argument --timeout: must be a number "
                    "of seconds from 5 to 3600")


@pytest.mark.parametrize("command", LOCK_TIMEOUT_COMMANDS)
@pytest.mark.parametrize("value", ["-1", "-0.001", "3601", "nan", "inf", "-inf", "x"])
def test_an_out_of_range_lock_timeout_is_a_usage_error_naming_the_range(command, value, capsys):
    code, line = _parse_error([command, f"--lock-timeout={value}"], capsys)
    assert code == 2
    assert line == (f"defender-setup {command}: error: argument --lock-timeout: must be a "
                    "number of seconds from 0 to 3600")


@pytest.mark.parametrize("option, value, expected", [
    ("--timeout", "5", 5.0), ("--timeout", "30", 30.0), ("--timeout", "3600", 3600.0),
    ("--timeout", "7.5", 7.5), ("--lock-timeout", "0", 0.0), ("--lock-timeout", "0.2", 0.2),
    ("--lock-timeout", "3600", 3600.0)])
def test_timeouts_in_range_are_accepted(option, value, expected, capsys):
    args = cli.build_parser().parse_args(["restart", option, value])
    assert getattr(args, option[2:].replace("-", "_")) == expected
    assert _parse_error(["restart", option, "-inf"], capsys)[0] == 2


def test_no_numeric_option_is_left_unbounded():
    """A plain type=float or type=int accepts -1, nan and inf: every number goes through a
    bounded type."""
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)]
    seen = set()
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.type not in (int, float), (name, action.option_strings)
            if getattr(action.type, "bounds", None):
                seen.add(action.option_strings[0])
    assert seen == {"--timeout", "--lock-timeout"}
