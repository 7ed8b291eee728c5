"""The debconf side of the maintainer scripts: read the answers, validate, write, clear secrets.

Interface (``/usr/lib/defender-setup/debconf-helper`` runs :func:`main`; ``debian/*.config``
and ``debian/*.postinst`` call it after sourcing the shell confmodule)::

    debconf-helper check [--root DIR]   # config: deep validation of the current answers,
        then the hub probe (unless defender-setup/probe-hub is false)
        exit 0 when valid (or nothing to change); otherwise prints one line
        "QUESTION<TAB>FIELD<TAB>REASON" on standard output (for the shell to re-ask
        defender-setup/QUESTION) and exits with the error's exit code (65, 66, 77...)
    debconf-helper apply [--root DIR]   # postinst configure: validate, probe, write, clear
        like ``defender-setup apply --no-restart --probe``; prints the summary on standard
        error; a refusal by the hub fails it before anything is written

Pure core, used by both and by the tests::

    Answers(method, connection_string, hub_hostname, device_id, module_id,
            certificate_file, private_key_file, seal)   # Answers.read(db) fills it over debconf
    resolve(answers, current, read=read_input) -> Inputs | None   # None: keep what is there
    question_for(error, answers) -> str                # which question to re-ask (by field)

Why over the debconf protocol: the shell confmodule already holds the frontend on standard
input and file descriptor 3, so the secret travels from debconf to Python without touching
argv, the environment or a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import DEFAULT_MODULE_ID
from . import connection_string as cs
from .credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE, method_of
from .errors import (
    AUTH_METHOD,
    CERTIFICATE,
    CONNECTION_STRING,
    DEVICE_ID,
    EX_OK,
    HUB_HOSTNAME,
    MODULE_ID,
    PRIVATE_KEY,
    InputError,
    SetupError,
    ValidationError,
    printable,
)
from .inputs import read_file
from .sealing import FIELD as SEALING
from .sealing import PENDING, deferral, kept_sealed, open_set, plain_set, require, store

PREFIX = "defender-setup/"
METHOD_LATER = "later"
SEAL_QUESTION = "seal-credentials"  # a boolean, acted on once (see _sealing_done)
# The question that holds each field's answer (errors carry their field: see errors.py).
QUESTIONS = {
    AUTH_METHOD: "auth-method",
    CONNECTION_STRING: "connection-string",
    CERTIFICATE: "certificate-file",
    PRIVATE_KEY: "private-key-file",
    HUB_HOSTNAME: "hub-hostname",
    DEVICE_ID: "device-id",
    MODULE_ID: "module-id",
    SEALING: SEAL_QUESTION,
    **{key: "connection-string" for key in cs.KNOWN_KEYS},
}
# When the certificate method's identity comes from its own questions (no connection string
# answer), the connection string is built from them: its keys are those questions.
IDENTITY_QUESTIONS = {cs.HOST_NAME: "hub-hostname", cs.DEVICE_ID: "device-id",
                      cs.MODULE_ID: "module-id"}
# One-shot inputs: cleared (keeping "seen") whatever happens, so no secret stays in debconf and
# a later noninteractive reconfigure does not re-read files the admin has since removed.
ONE_SHOT = ("connection-string", "certificate-file", "private-key-file")


@dataclass(frozen=True)
class Answers:
    """The debconf answers; ``connection_string`` is a secret and kept out of ``repr``."""

    method: str = METHOD_LATER
    connection_string: str = field(default="", repr=False)
    hub_hostname: str = ""
    device_id: str = ""
    module_id: str = DEFAULT_MODULE_ID
    certificate_file: str = ""
    private_key_file: str = ""
    seal: bool = False

    @classmethod
    def read(cls, db) -> Answers:
        """Read every question over the debconf protocol (``db``: a ``debconf.Debconf``)."""
        def get(name: str) -> str:
            return db.get(PREFIX + name)

        return cls(method=get("auth-method") or METHOD_LATER,
                   connection_string=get("connection-string"),
                   hub_hostname=get("hub-hostname").strip(),
                   device_id=get("device-id").strip(),
                   module_id=get("module-id").strip() or DEFAULT_MODULE_ID,
                   certificate_file=get("certificate-file").strip(),
                   private_key_file=get("private-key-file").strip(),
                   seal=get(SEAL_QUESTION) == "true")


@dataclass(frozen=True)
class Inputs:
    """What :func:`defender_setup.credentials.validate` gets; secrets kept out of ``repr``."""

    method: str
    connection_string: bytes = field(repr=False)
    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)


def read_input(path: str, field_name: str) -> bytes:
    """Read a file named in an answer (bounded, regular files only); errors name the path."""
    if not os.path.isabs(path):
        raise InputError(f"{printable(path)} is not an absolute path; give the full path",
                         field_name)
    return read_file(path, field_name)


def _identity_part(value: str, field_name: str) -> str:
    # These are spliced into "Key=Value;..." below: a ';' or '=' would smuggle in other keys.
    if not value:
        raise ValidationError(field_name, "is empty; fill it in (or give a connection string "
                              "with x509=true)")
    bad = next((n for n, c in enumerate(value, 1)
                if c in ";= \t\"'" or not (" " < c <= "~")), None)
    if bad is not None:
        raise ValidationError(field_name, f"character {bad} (U+{ord(value[bad - 1]):04X}) is not "
                              "allowed; retype it by hand")
    return value


def resolve(answers: Answers, current: dict[str, bytes],
            read: Callable[[str, str], bytes] = read_input) -> Inputs | None:
    """Turn the answers into inputs for validation; ``None`` means "keep what is there".

    An empty secret (or an empty file path) keeps the corresponding current file when the
    current credentials use the same method.

    :param current: the credential files present now (``AgentDir.current()``).
    :param read: reads a file named in an answer (tests pass their own).
    :raises ValidationError: an answer is missing or malformed.
    :raises InputError: a named file is missing or unreadable.
    """
    method = answers.method
    same = method_of(current) == method
    if method == METHOD_LATER:
        return None
    if method == "connection-string":
        if not answers.connection_string:
            if same:
                return None
            raise ValidationError(CONNECTION_STRING, "is empty; preseed or enter the "
                                  "module's connection string (HostName=...;SharedAccessKey=...)")
        return Inputs(method, answers.connection_string.encode("utf-8"))
    if method != "certificate":
        raise ValidationError(AUTH_METHOD, "is none of connection-string, certificate, "
                              "later; preseed one of them")
    if answers.connection_string:
        text = answers.connection_string.encode("utf-8")
    elif not answers.hub_hostname and not answers.device_id and same:
        text = current[CONNECTION_STRING_FILE]
    else:
        text = cs.from_parts(_identity_part(answers.hub_hostname, HUB_HOSTNAME),
                             _identity_part(answers.device_id, DEVICE_ID),
                             _identity_part(answers.module_id, MODULE_ID)).encode("ascii")
    cert = key = None
    if answers.certificate_file:
        cert = read(answers.certificate_file, CERTIFICATE)
    elif same:
        cert = current.get(CERTIFICATE_FILE)
    if answers.private_key_file:
        key = read(answers.private_key_file, PRIVATE_KEY)
    elif same:
        key = current.get(PRIVATE_KEY_FILE)
    if cert is None:
        raise ValidationError(CERTIFICATE, "no certificate file given; enter the path of "
                              "the PEM certificate")
    if key is None:
        raise ValidationError(PRIVATE_KEY, "no private key file given; enter the path of "
                              "the PEM private key")
    return Inputs(method, text, cert, key)


def question_for(error: SetupError, answers: Answers) -> str:
    """The question whose answer caused ``error`` (the one the config script re-asks).

    Routed by the error's ``field`` through :data:`QUESTIONS`; an error about no answer in
    particular (an unsafe target, a write failure) goes back to the method's first question.
    """
    field_name = error.field
    if answers.method == "certificate" and not answers.connection_string \
            and field_name in IDENTITY_QUESTIONS:
        return IDENTITY_QUESTIONS[field_name]
    if field_name in QUESTIONS:
        return QUESTIONS[field_name]
    return "connection-string" if answers.method == "connection-string" else "auth-method"


def _reason(error: SetupError) -> tuple[str, str]:
    """``(field, reason)`` of an error, one line each, for the shell and the error template."""
    return error.field or "credentials", " ".join(error.message.split())


def open_channel():
    """The debconf channel the shell confmodule holds: replies on stdin, commands on fd 3."""
    import debconf

    class Channel(debconf.Debconf):
        def setUp(self, title):
            # The stock setUp sends an empty CAPB, which would switch off the shell's
            # "backup escape" for the rest of the session; ask for exactly those again.
            # command() directly: the method for VERSION is "version" up to Debian 12 and
            # "version_" from 13 on, where "version" holds the protocol version string.
            self.version = self.command("version", 2)
            self.capabilities = self.command("capb", "backup", "escape").split()

    return Channel(write=os.fdopen(3, "w"))


def _validate(inputs: Inputs):
    from .credentials import validate

    return validate(inputs.method, inputs.connection_string, inputs.certificate,
                    inputs.private_key)


def check(db, root: Path) -> tuple[int, str]:
    """Validate the answers; return ``(exit code, "QUESTION\\tFIELD\\tREASON" or "")``."""
    from .agentdir import AgentDir

    answers = Answers.read(db)
    try:
        current = open_set(AgentDir(root).current())[0]  # sealed files decrypted
        inputs = resolve(answers, current)
        if inputs is not None:
            _probe(db, _validate(inputs), root, current)
    except SetupError as exc:
        field_name, reason = _reason(exc)
        return exc.exit_code, f"{question_for(exc, answers)}\t{field_name}\t{reason}"
    return EX_OK, ""


def _probe(db, validated, root: Path, current: dict, out=None) -> None:
    """One connection to the hub with NEW credentials, unless probe-hub is false.

    Credentials equal to the ``current`` files are not tried: they are not new, and a second
    connection as the same identity would knock the running agent off the hub.

    :raises defender_setup.probe.ProbeRefused: the hub refused them (a ValidationError whose
        field routes the re-ask to the connection string or the certificate question).
    """
    if _same(validated, current) or db.get(PREFIX + "probe-hub") == "false":
        return
    from .probe import probe

    outcome = probe(validated, root)
    if outcome.error is not None:
        raise outcome.error  # reported once, as the answer's error
    if out is not None:
        print(f"defender-setup: {outcome.line}", file=out)


def _same(validated, current: dict) -> bool:
    return {name: data for name, (data, _) in validated.files.items()} == current


def _stored_as_asked(agent, how, seal: bool) -> bool:
    """Whether the set is stored as defender-setup/seal-credentials asks. False asks for
    nothing: a sealed set stays sealed until "defender-setup unseal" (so a default answer
    never writes a secret back in plain text)."""
    if not seal:
        return True
    # Sealed already, or still waiting for the first boot where sealing cannot happen yet.
    return bool(how.sealed) or (agent.record(PENDING) is not None
                                and deferral(agent.root) is not None)


def _clear_one_shot(db) -> None:
    for name in ONE_SHOT:
        db.set(PREFIX + name, "")


def _sealing_done(db) -> None:
    """The answer true is acted on once (sealed, or deferred to the first boot): left true,
    it would seal the set again at the next configure after a "defender-setup unseal". The
    config script shows true again while the set is sealed. Kept on failure, so that a retry
    never writes the secrets plain."""
    db.set(PREFIX + SEAL_QUESTION, "false")


def apply(db, root: Path, out) -> int:
    """Validate and write the answers (``apply --no-restart``); always clear the secrets."""
    from .agentdir import AgentDir

    agent = AgentDir(root)
    answers = None
    try:
        answers = Answers.read(db)
        current, how = open_set(agent.current())  # sealed files decrypted: "keep" needs them
        inputs = resolve(answers, current)
        if inputs is None:
            state = method_of(current)
            if state and not _stored_as_asked(agent, how, answers.seal):
                with agent.lock():  # only the storage changes: sealed, or plain again
                    files, method, _ = plain_set(agent)
                    for line in store(agent, files, method, answers.seal, origin="debconf"):
                        print(f"defender-setup: {line}", file=out)
            elif state:  # unconfigured: the postinst says how to configure
                print(f"defender-setup: credentials unchanged ({state}, {how.describe()})",
                      file=out)
            _sealing_done(db)
            return EX_OK
        validated = _validate(inputs)
        for line in validated.summary_lines():
            print(f"  {line}", file=out)
        for warning in validated.warnings:
            print(f"defender-setup: warning: {warning}", file=out)
        if answers.seal:
            require(root)  # one line naming the question, before anything is written
        # before the lock (the hub may take seconds); a refusal raises: nothing is written
        _probe(db, validated, root, current, out)
        with agent.lock():  # the writers' lock (exit 75 if another keeps it for 30 s)
            now, how = open_set(agent.current())
            if _same(validated, now) and _stored_as_asked(agent, how, answers.seal):
                print("defender-setup: credentials unchanged (same as written before)",
                      file=out)
            else:
                for line in store(agent, validated.files, validated.method,
                                  answers.seal or kept_sealed(agent), origin="debconf"):
                    print(f"defender-setup: {line}", file=out)
        ident = validated.connection_string
        # Keep debconf showing what is configured now (dpkg-reconfigure starts from it).
        db.set(PREFIX + "auth-method", validated.method)
        db.set(PREFIX + "hub-hostname", ident.host_name)
        db.set(PREFIX + "device-id", ident.device_id)
        db.set(PREFIX + "module-id", ident.module_id)
        _sealing_done(db)
        return EX_OK
    except SetupError as exc:
        field_name, reason = _reason(exc)
        question = question_for(exc, answers) if answers else "auth-method"
        print(f"defender-setup: invalid {field_name}: {reason} (debconf question "
              f"{PREFIX}{question})", file=sys.stderr)
        return exc.exit_code
    finally:
        _clear_one_shot(db)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="debconf-helper",
                                     description="internal: called by the maintainer scripts")
    parser.add_argument("command", choices=("check", "apply"))
    parser.add_argument("--root", default="/", metavar="DIR")
    args = parser.parse_args(argv)
    root = Path(args.root)
    out = sys.stderr  # standard output is the shell's (check's result line only)
    db = open_channel()
    if args.command == "check":
        code, line = check(db, root)
        if line:
            os.write(1, (line + "\n").encode("utf-8", "replace"))
        return code
    return apply(db, root, out)

