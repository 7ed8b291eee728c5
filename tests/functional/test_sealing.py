"""defender_setup.sealing through systemd-creds (the fake in tests/fakes.py, first on PATH):
both generations sealed, no key on argv, another machine cannot decrypt, switches, unseal."""

from __future__ import annotations

import subprocess

import pytest

from defender_setup import sealing
from defender_setup.agentdir import AgentDir
from defender_setup.credentials import (
    CERTIFICATE_FILE,
    CONNECTION_STRING_FILE,
    PRIVATE_KEY_FILE,
    method_of,
)
from defender_setup.errors import InputError
from defender_setup.provision import Request, commit, plan, read
from tests import certfactory
from tests.conftest import snapshot
from tests.fakes import HOST_AND_TPM2, FakeCreds, debian12, seal_here

CS_SEALED = CONNECTION_STRING_FILE + ".cred"
KEY_SEALED = PRIVATE_KEY_FILE + ".cred"


@pytest.fixture
def creds(root, tmp_path, monkeypatch):
    debian12(root)
    fake = FakeCreds(tmp_path)
    fake.path_env(monkeypatch)
    return fake


def secret_of(inputs) -> list[bytes]:
    text = inputs.connection_string.decode()
    found = [text.split("SharedAccessKey=")[1].encode()] if "SharedAccessKey=" in text else []
    if inputs.private_key:
        found += [line.encode() for line in certfactory.body(inputs.private_key)]
    return found


def everything_under(root) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def store(root, inputs, seal_it=True):
    validated = inputs.validated()
    return sealing.store(AgentDir(root), validated.files, validated.method, seal_it,
                         defer=seal_here)


@pytest.mark.allow_subprocess("systemd-creds")
def test_seal_keeps_no_plain_copy_in_either_generation(root, creds, sas_inputs):
    AgentDir(root).write(sas_inputs.validated().files)  # a plain set first, as before sealing
    lines = store(root, sas_inputs)
    agent = AgentDir(root)
    assert set(agent.current()) == {CS_SEALED}
    assert set((agent.state / "previous").iterdir()) == {agent.state / "previous" / CS_SEALED}
    assert lines[1] == "sealed with the host key; the previous set is sealed too"
    for secret in secret_of(sas_inputs):
        assert secret not in everything_under(root)
        assert all(secret.decode() not in call for call in creds.calls())  # never on argv
    plain, how = sealing.open_set(agent.current())
    assert plain[CONNECTION_STRING_FILE] == sas_inputs.validated().files[
        CONNECTION_STRING_FILE][0]
    assert how.describe() == "sealed (host key)" and how.error is None


@pytest.mark.allow_subprocess("systemd-creds")
def test_certificate_method_seals_the_private_key_only(root, creds, cert_inputs):
    creds.kind(HOST_AND_TPM2)
    store(root, cert_inputs)
    current = AgentDir(root).current()
    assert set(current) == {CONNECTION_STRING_FILE, CERTIFICATE_FILE, KEY_SEALED}
    assert method_of(current) == "certificate"
    for secret in secret_of(cert_inputs):
        assert secret not in everything_under(root)
    assert sealing.open_set(current)[1].describe() == "sealed (TPM2 + host key)"


@pytest.mark.allow_subprocess("systemd-creds")
def test_another_machine_cannot_decrypt(root, creds, sas_inputs):
    store(root, sas_inputs)
    creds.machine(b"machine two")
    plain, how = sealing.open_set(AgentDir(root).current())
    assert CONNECTION_STRING_FILE not in plain
    assert how.error == (f"{CS_SEALED} does not decrypt on this machine: Decryption failed "
                         "(incorrect key?): error:00000000:lib(0)::reason(0)")
    with pytest.raises(sealing.SealingError, match="give the credentials again"):
        Request.again(read(AgentDir(root)), seal=False)


@pytest.mark.allow_subprocess("systemd-creds")
def test_switching_method_and_rollback_keep_the_sets_whole(root, creds, sas_inputs, cert_inputs):
    store(root, sas_inputs)
    store(root, cert_inputs)
    agent = AgentDir(root)
    assert set(agent.current()) == {CONNECTION_STRING_FILE, CERTIFICATE_FILE, KEY_SEALED}
    agent.rollback()
    assert set(agent.current()) == {CS_SEALED}
    assert sealing.open_set(agent.current())[0][CONNECTION_STRING_FILE] == \
        sas_inputs.validated().files[CONNECTION_STRING_FILE][0]


@pytest.mark.allow_subprocess("systemd-creds")
def test_unseal_goes_back_to_plain_files(root, creds, cert_inputs):
    store(root, cert_inputs)
    stored = read(AgentDir(root))
    assert stored.sealing.sealed == (KEY_SEALED,)
    p = plan(Request.again(stored, seal=False), stored)
    assert not p.unchanged and p.validated.files[CERTIFICATE_FILE][1] == 0o644
    assert commit(AgentDir(root), p)
    agent = AgentDir(root)
    assert agent.current()[PRIVATE_KEY_FILE] == cert_inputs.validated().files[
        PRIVATE_KEY_FILE][0]
    assert (agent.path / PRIVATE_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert KEY_SEALED in {p.name for p in (agent.state / "previous").iterdir()}


@pytest.mark.allow_subprocess("systemd-creds")
def test_check_decrypts_each_sealed_file_once_for_every_check(root, creds, cert_inputs,
                                                              capsys):
    """One snapshot: the local checks and the network checks see the same set, and the
    sealed key is decrypted once (it was decrypted again, outside the lock, for the
    network checks). The hub is unreachable here (a name under .invalid)."""
    import json

    from defender_setup import cli

    text = cert_inputs.connection_string.replace(b"HostName=", b"GatewayHostName=hub.invalid;"
                                                 b"HostName=")
    sealing.store(AgentDir(root), cert_inputs.validated().files | {
        CONNECTION_STRING_FILE: (text.replace(b"\n", b"") + b"\n", 0o600)},
        "certificate", True, defer=seal_here)
    before = len([c for c in creds.calls() if c.startswith("decrypt")])
    cli.main(["check", "--json", "--root", str(root)])
    results = {r["id"]: r for r in json.loads(capsys.readouterr().out)["checks"]}
    assert results["credentials-valid"]["status"] == "ok", results
    assert results["hub-dns"]["status"] == "error", results  # the network checks ran
    assert len([c for c in creds.calls() if c.startswith("decrypt")]) - before == 1


# -- faults: a failing encrypt, an interrupted seal ----------------------------------------
class FailingCreds:
    """``sealing``'s runner: the fake systemd-creds, except that encrypt number ``fail_at``
    fails as a busy TPM2 would."""

    def __init__(self, fail_at: int):
        self.fail_at, self.encrypts, self.failed = fail_at, 0, False

    def __call__(self, argv, data):
        if argv[1] == "encrypt":
            self.encrypts += 1
            if self.encrypts == self.fail_at:
                self.failed = True
                return subprocess.CompletedProcess(argv, 1, b"", b"TPM2 busy\n")
        return subprocess.run(argv, input=data, capture_output=True, check=False)


def sealed_now(agent) -> bool:
    return any(name.endswith(".cred") for name in agent.current())


def seal_again(agent):
    """``defender-setup seal`` through the core (sealing here, in a throw-away root)."""
    stored = read(agent, defer=seal_here)
    lines = commit(agent, plan(Request.again(stored, seal=True, origin="seal"), stored),
                   defer=seal_here)
    return lines or None


def generations(agent) -> dict:
    """Both generations' bytes: ``{"current": b"...", "previous": b"..."}``."""
    previous = agent.state / "previous"
    return {"current": b"".join(agent.current().values()),
            "previous": b"".join(p.read_bytes() for p in sorted(previous.iterdir()))
            if previous.is_dir() else b""}


def assert_sealed_set_hides(agent, *inputs):
    """Where the current set is sealed, neither generation holds a secret of ``inputs``."""
    if not sealed_now(agent):
        return
    for where, data in generations(agent).items():
        for secret in (s for i in inputs for s in secret_of(i)):
            assert secret not in data, f"a plain secret in the {where} generation"


@pytest.mark.allow_subprocess("systemd-creds")
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failing_encrypt_writes_nothing(root, creds, sas_inputs, cert_inputs, fail_at):
    AgentDir(root).write(sas_inputs.validated().files)  # plain: two encrypts to seal B over it
    before = snapshot(root)
    runner = FailingCreds(fail_at)
    validated = cert_inputs.validated()
    with pytest.raises(sealing.SealingError, match="cannot be sealed: TPM2 busy"):
        sealing.store(AgentDir(root), validated.files, validated.method, True,
                      runner=runner, defer=seal_here)
    assert runner.failed, "the fault did not land"
    agent = AgentDir(root)
    assert_sealed_set_hides(agent, sas_inputs, cert_inputs)
    assert snapshot(root) == before, "a failed seal changed the files"
    for secret in secret_of(cert_inputs):
        assert secret not in everything_under(root)


@pytest.mark.allow_subprocess("systemd-creds")
def test_rollback_after_a_failed_seal_puts_no_plain_secret_back(root, creds, sas_inputs,
                                                                 cert_inputs):
    AgentDir(root).write(sas_inputs.validated().files)
    validated = cert_inputs.validated()
    with pytest.raises(sealing.SealingError):
        sealing.store(AgentDir(root), validated.files, validated.method, True,
                      runner=FailingCreds(2), defer=seal_here)
    agent = AgentDir(root)
    sealed_before = sealed_now(agent)
    try:
        agent.rollback()
    except InputError:  # nothing was written: no previous set to go back to
        pass
    if sealed_before:
        assert sealed_now(agent), "rollback made a sealed set plain again"
    assert_sealed_set_hides(agent, sas_inputs)


def interrupted_seal(root, inputs):
    """What a seal killed after sealing the current set in place used to leave: the current
    set sealed, its plain copy in the previous generation."""
    agent = AgentDir(root)
    validated = inputs.validated()
    agent.write(validated.files, origin="apply")
    agent.write(sealing.seal(validated.files, validated.method), origin="seal")
    assert set(agent.current()) == {CS_SEALED}
    assert (agent.state / "previous" / CONNECTION_STRING_FILE).exists()
    return agent


@pytest.mark.allow_subprocess("systemd-creds")
def test_seal_again_seals_a_plain_previous_generation(root, creds, sas_inputs):
    agent = interrupted_seal(root, sas_inputs)
    sealed_now = agent.current()
    assert sealing.plain_left(agent) == [CONNECTION_STRING_FILE]
    lines = seal_again(agent)
    assert lines is not None, "said nothing to do with a plain secret left"
    assert sealing.plain_left(agent) == []
    assert agent.current() == sealed_now  # the current set was sealed already: untouched
    assert {p.name for p in (agent.state / "previous").iterdir()} == {CS_SEALED}
    for secret in secret_of(sas_inputs):
        assert secret not in everything_under(root)
    assert seal_again(agent) is None  # nothing to do now
    agent.rollback()  # the sealed previous generation still restores
    assert sealing.open_set(agent.current())[0][CONNECTION_STRING_FILE] == \
        sas_inputs.validated().files[CONNECTION_STRING_FILE][0]
