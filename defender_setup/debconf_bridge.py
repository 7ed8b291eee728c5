"""The debconf side of the maintainer scripts: read the answers, validate, write, clear secrets.

Interface (``/usr/lib/defender-setup/debconf-helper`` runs :func:`main`; ``debian/*.config``
and ``debian/*.postinst`` call it after sourcing the shell confmodule)::

    debconf-helper check [--root DIR]   # config: deep validation of the current answers,
        then the hub probe (unless defender-setup/probe-hub is false)
        exit 0 when valid (or nothing to change); otherwise prints one line
        "QUESTION<TAB>FIELD<TAB>REASON" on standard output (for the shell to re-ask
        defender-setup/QUESTION) and exits with the error's exit code (65, 66, 77...)
    debconf-helper agent-dir [--root DIR]   # the directory of the installed agent (the
        maintainer scripts test for files there; no debconf needed)
    debconf-helper current [--root DIR]   # config: what is configured now, as
        "NAME<TAB>VALUE" lines (method, sealed, HostName, DeviceId, ModuleId; no secret)
    debconf-helper apply [--root DIR]   # postinst configure: validate, probe, write, clear
        like ``defender-setup apply --no-restart --probe``; prints the summary on standard
        error; a refusal by the hub fails it before anything is written

Pure core, used by both and by the tests::

    Answers(method, connection_string, hub_hostname, device_id, module_id,
            certificate_file, private_key_file, seal, dps_*)   # Answers.read(db) fills it
    resolve(answers, current, read=read_input) -> Inputs | None   # None: keep what is there
    question_for(error, answers) -> str                # which question to re-ask (by field)

The ``dps`` method (the device registers itself) is :mod:`defender_setup.debconf_dps`.

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

from . import DEFAULT_MODULE_ID, debconf_dps, debconf_probe, provision
from . import connection_string as cs
from .agentdir import READ_WAIT, WRITE_WAIT, AgentDir
from .credentials import (
    CERTIFICATE_FILE,
    CONNECTION_STRING_FILE,
    PRIVATE_KEY_FILE,
    SEALED_NAMES,
    method_of,
)
from .errors import (
    AUTH_METHOD,
    CERTIFICATE,
    CONNECTION_STRING,
    DEVICE_ID,
    EX_OK,
    HUB_HOSTNAME,
    MODULE_ID,
    PRIVATE_KEY,
    Field,
    InputError,
    SetupError,
    ValidationError,
    printable,
)
from .inputs import read_file
from .provision import Request
from .sealing import FIELD as SEALING
from .sealing import require

PREFIX = "defender-setup/"
METHOD_LATER = "later"
METHOD_DPS = "dps"
SEAL_QUESTION = "seal-credentials"  # a boolean, acted on once (see apply)
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
    Field.DPS_ID_SCOPE: "dps-id-scope",
    Field.DPS_REGISTRATION_ID: "dps-registration-id",
    Field.DPS_ATTESTATION: "dps-attestation",
    Field.DPS_KEY: "dps-symmetric-key",
    Field.DPS_ENDPOINT: "dps-endpoint",
    Field.DPS_ENROLLMENT: "dps-id-scope",  # DPS knows no such enrollment, or it is disabled
}
# When the certificate method's identity comes from its own questions (no connection string
# answer), the connection string is built from them: its keys (an error's part) are those
# questions.
IDENTITY_QUESTIONS = {cs.HOST_NAME: "hub-hostname", cs.DEVICE_ID: "device-id",
                      cs.MODULE_ID: "module-id"}
# One-shot inputs: cleared (keeping "seen") whatever happens, so no secret stays in debconf and
# a later noninteractive reconfigure does not re-read files the admin has since removed.
ONE_SHOT = ("connection-string", "certificate-file", "private-key-file", "dps-symmetric-key")


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
    dps_id_scope: str = ""
    dps_registration_id: str = ""
    dps_attestation: str = "symmetric-key"
    dps_key: str = field(default="", repr=False)
    dps_group_key: bool = False
    dps_endpoint: str = ""

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
                   seal=get(SEAL_QUESTION) == "true",
                   dps_id_scope=get("dps-id-scope").strip(),
                   dps_registration_id=get("dps-registration-id").strip(),
                   dps_attestation=get("dps-attestation").strip() or "symmetric-key",
                   dps_key=get("dps-symmetric-key"),
                   dps_group_key=get("dps-key-is-group-key") == "true",
                   dps_endpoint=get("dps-endpoint").strip())


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


def resolve(answers: Answers, stored, read: Callable[[str, str], bytes] = read_input):
    """Turn the answers into a provisioning request; ``None`` when none is asked ("later").

    An empty secret (or an empty file path) keeps the corresponding stored file when the
    stored credentials use the same method; no new answer at all asks for the stored set
    again (the plan finds it unchanged, or only its sealing changes).

    :param stored: the stored set (``provision.read``), sealed files decrypted.
    :param read: reads a file named in an answer (tests pass their own).
    :raises ValidationError: an answer is missing or malformed.
    :raises InputError: a named file is missing or unreadable.
    """
    method = answers.method
    if method == METHOD_LATER:
        return None
    same = stored.method == method
    current = stored.plain
    kw = {"method": method, "seal": True if answers.seal else None, "origin": "debconf",
          "probe": True}  # new credentials only (the plan says); probe-hub may say no
    if method == "connection-string":
        if not answers.connection_string:
            if same:
                return Request.again(stored, **kw)
            raise ValidationError(CONNECTION_STRING, "is empty; preseed or enter the "
                                  "module's connection string (HostName=...;SharedAccessKey=...)")
        return Request(answers.connection_string.encode("utf-8"), **kw)
    if method != "certificate":
        raise ValidationError(AUTH_METHOD, "is none of connection-string, certificate, "
                              "dps, later; preseed one of them")
    if answers.connection_string:
        text = answers.connection_string.encode("utf-8")
    elif not answers.hub_hostname and not answers.device_id and same:
        text = current[CONNECTION_STRING_FILE]
    else:
        text = cs.from_parts(_identity_part(answers.hub_hostname, HUB_HOSTNAME),
                             _identity_part(answers.device_id, DEVICE_ID),
                             _identity_part(answers.module_id, MODULE_ID)).encode("ascii")
    def new_or_kept(path: str, field_name: Field, name: str) -> bytes | None:
        if path:
            return read(path, field_name)
        return current.get(name) if same else None

    return Request(text, new_or_kept(answers.certificate_file, CERTIFICATE, CERTIFICATE_FILE),
                   new_or_kept(answers.private_key_file, PRIVATE_KEY, PRIVATE_KEY_FILE),
                   **kw)  # a missing file: the plan names it


def question_for(error: SetupError, answers: Answers) -> str:
    """The question whose answer caused ``error`` (the one the config script re-asks).

    Routed by the error's ``field`` through :data:`QUESTIONS`; an error about no answer in
    particular (an unsafe target, a write failure) goes back to the method's first question.
    """
    if answers.method == "certificate" and not answers.connection_string \
            and error.field == CONNECTION_STRING and error.part in IDENTITY_QUESTIONS:
        return IDENTITY_QUESTIONS[error.part]
    if answers.method == METHOD_DPS and error.part == cs.MODULE_ID:  # DPS checks the hub's rule
        return "module-id"
    if error.field in QUESTIONS:
        return QUESTIONS[error.field]
    first = {"connection-string": "connection-string", METHOD_DPS: "dps-id-scope"}
    return first.get(answers.method, "auth-method")


def _reason(error: SetupError) -> tuple[str, str]:
    """``(field, reason)`` of an error, one line each, for the shell and the error template."""
    return error.label or "credentials", " ".join(error.message.split())


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


def check(db, root: Path) -> tuple[int, str]:
    """Validate the answers; return ``(exit code, "QUESTION\tFIELD\tREASON" or "")``."""
    answers = Answers.read(db)
    try:
        if answers.method == METHOD_DPS:
            debconf_dps.check(answers, root, _origin(root), read_input,
                              debconf_dps.deferral(root) is not None)
            return EX_OK, ""
        stored = provision.read(AgentDir(root))
        request = resolve(answers, stored)
        if request is not None:
            p = provision.plan(request, stored)
            if _probe_wanted(db, p):
                debconf_probe.at_config(p, root)
    except SetupError as exc:
        field_name, reason = _reason(exc)
        return exc.exit_code, f"{question_for(exc, answers)}\t{field_name}\t{reason}"
    return EX_OK, ""


def _probe_wanted(db, p) -> bool:
    """New credentials (the plan says whether they are) meet the hub once (at most one
    connection per dpkg run: :mod:`defender_setup.debconf_probe`), unless probe-hub is false."""
    return p.probe and db.get(PREFIX + "probe-hub") != "false"


def apply(db, root: Path, out) -> int:
    """Validate and write the answers (``apply --no-restart``); always clear the secrets."""
    answers = None
    try:
        answers = Answers.read(db)
        if answers.method == METHOD_DPS:
            code = _apply_dps(db, answers, root, out)
        else:
            code = _apply_set(db, answers, root, out)
        # The answer true is acted on once (sealed, or deferred to the first boot): left
        # true, it would seal the set again at the next configure after a "defender-setup
        # unseal". The config script shows true again while the set is sealed. Kept on
        # failure, so that a retry never writes the secrets plain.
        db.set(PREFIX + SEAL_QUESTION, "false")
        return code
    except SetupError as exc:
        field_name, reason = _reason(exc)
        question = question_for(exc, answers) if answers else "auth-method"
        print(f"defender-setup: invalid {field_name}: {reason} (debconf question "
              f"{PREFIX}{question})", file=sys.stderr)
        return exc.exit_code
    finally:
        for name in ONE_SHOT:
            db.set(PREFIX + name, "")


def _apply_set(db, answers: Answers, root: Path, out) -> int:
    """A connection string or a certificate (or "later"): plan, probe, commit."""
    agent = AgentDir(root)
    stored = provision.read(agent, WRITE_WAIT)  # sealed files decrypted: "keep" needs them
    request = resolve(answers, stored)
    if request is None:  # later: the postinst says how to configure
        return EX_OK
    p = provision.plan(request, stored)
    if not p.unchanged:
        for line in p.validated.summary_lines():
            print(f"  {line}", file=out)
    for warning in p.validated.warnings:
        print(f"defender-setup: warning: {warning}", file=out)
    if p.seal and not p.unchanged:
        require(root)  # one line naming the question, before anything is written
    # before the lock (the hub may take seconds); a refusal raises: nothing is written
    if _probe_wanted(db, p):
        print(f"defender-setup: {debconf_probe.at_postinst(p, root)}", file=out)
    with agent.lock():  # the writers' lock (exit 75 if another keeps it for 30 s)
        lines = provision.commit(agent, p)
    for line in lines or [f"credentials unchanged ({p.validated.method}, "
                          f"{stored.sealing.describe()})"]:
        print(f"defender-setup: {line}", file=out)
    ident = p.validated.connection_string
    # Keep debconf showing what is configured now (dpkg-reconfigure starts from it).
    db.set(PREFIX + "auth-method", p.validated.method)
    db.set(PREFIX + "hub-hostname", ident.host_name)
    db.set(PREFIX + "device-id", ident.device_id)
    db.set(PREFIX + "module-id", ident.module_id)
    return EX_OK


def _origin(root: Path) -> str | None:
    return (AgentDir(root).origin() or {}).get("source")


def current(root: Path) -> dict[str, str]:
    """What is configured now, for the config script to start from.

    The core's one rule decides the method (:func:`credentials.method_of`: the connection
    string), not which files exist; a module the device made itself through DPS is the
    ``dps`` choice. Only non-secret fields, and none of a sealed connection string (nothing
    is decrypted for a form's defaults).

    :raises SetupError: the directory is unsafe, or a writer kept the lock.
    """
    agent = AgentDir(root)
    with agent.read_lock(READ_WAIT):
        agent.check()
        files, origin = agent.current(), (agent.origin() or {}).get("source")
    method = method_of(files)
    if method is None:
        return {}
    if method == cs.METHOD_CONNECTION_STRING and origin == debconf_dps.ORIGIN:
        method = METHOD_DPS
    now = {"method": method,
           "sealed": str(any(n in files for n in SEALED_NAMES.values())).lower()}
    try:
        ident = cs.parse(files[CONNECTION_STRING_FILE])
    except (KeyError, ValidationError):  # sealed, or hand-edited beyond use: no defaults
        return now
    return {**now, "HostName": ident.host_name, "DeviceId": ident.device_id,
            "ModuleId": ident.module_id}


def _apply_dps(db, answers: Answers, root: Path, out) -> int:
    """Register through DPS (or, in an image build, only check); the postinst's trigger
    restarts and verifies as for the other methods."""
    from .zerotouch import run

    return debconf_dps.apply(answers, root, out, stored_origin=_origin(root), read=read_input,
                             deferred=debconf_dps.deferral(root), register=run,
                             strict=db.get(PREFIX + "strict-verify") == "true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="debconf-helper",
                                     description="internal: called by the maintainer scripts")
    parser.add_argument("command", choices=("check", "apply", "agent-dir", "current"))
    parser.add_argument("--root", default="/", metavar="DIR")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.command == "agent-dir":  # where the installed agent reads (target.detect decides)
        print(AgentDir(root).path)
        return 0
    if args.command == "current":
        try:
            now = current(root)
        except SetupError as exc:  # the config script then starts from debconf's answers
            return exc.exit_code
        print("".join(f"{name}\t{value}\n" for name, value in now.items()), end="")
        return 0
    out = sys.stderr  # standard output is the shell's (check's result line only)
    db = open_channel()
    if args.command == "check":
        code, line = check(db, root)
        if line:
            os.write(1, (line + "\n").encode("utf-8", "replace"))
        return code
    return apply(db, root, out)

