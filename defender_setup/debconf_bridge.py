"""The debconf side of the maintainer scripts: read the answers, validate, write, clear secrets.

Interface (``/usr/lib/defender-setup/debconf-helper`` runs :func:`main`; ``debian/*.config``
and ``debian/*.postinst`` call it after sourcing the shell confmodule)::

    debconf-helper check [--root DIR]   # config: deep validation of the current answers
        exit 0 when valid (or nothing to change); otherwise prints one line
        "QUESTION<TAB>FIELD<TAB>REASON" on standard output (for the shell to re-ask
        defender-setup/QUESTION) and exits with the error's exit code (65, 66, 77...)
    debconf-helper apply [--root DIR]   # postinst configure: validate, write, clear secrets
        like ``defender-setup apply --no-restart``; prints the summary on standard error

Pure core, used by both and by the tests::

    Answers(method, connection_string, hub_hostname, device_id, module_id,
            certificate_file, private_key_file)      # Answers.read(db) fills it over debconf
    resolve(answers, current, read=read_input) -> Inputs | None   # None: keep what is there
    question_for(error, answers) -> str                # which question to re-ask

Why over the debconf protocol: the shell confmodule already holds the frontend on standard
input and file descriptor 3, so the secret travels from debconf to Python without touching
argv, the environment or a file (RECIPES.md, "debconf from Python").
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import DEFAULT_MODULE_ID
from .credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE, method_of
from .errors import EX_OK, InputError, SetupError, ValidationError
from .inputs import read_file

PREFIX = "defender-setup/"
METHOD_LATER = "later"
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
                   private_key_file=get("private-key-file").strip())


@dataclass(frozen=True)
class Inputs:
    """What :func:`defender_setup.credentials.validate` gets; secrets kept out of ``repr``."""

    method: str
    connection_string: bytes = field(repr=False)
    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)


def read_input(path: str, what: str) -> bytes:
    """Read a file named in an answer; errors name the path and the fix, never content."""
    if not os.path.isabs(path):
        raise InputError(f"{what} file: {path} is not an absolute path; give the full path")
    return read_file(path, f"{what} file")


def _identity_part(value: str, what: str) -> str:
    # These are spliced into "Key=Value;..." below: a ';' or '=' would smuggle in other keys.
    if not value:
        raise ValidationError(what, "is empty; fill it in (or give a connection string with "
                              "x509=true)")
    bad = next((c for c in value if c in ";= \t\"'" or not (" " < c <= "~")), None)
    if bad is not None:
        raise ValidationError(what, f"contains {bad!r} (U+{ord(bad):04X}), which is not "
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
            raise ValidationError("connection string", "is empty; preseed or enter the "
                                  "module's connection string (HostName=...;SharedAccessKey=...)")
        return Inputs(method, answers.connection_string.encode("utf-8"))
    if method != "certificate":
        raise ValidationError("authentication method", f"{method!r} is not one of "
                              "connection-string, certificate, later")
    if answers.connection_string:
        text = answers.connection_string.encode("utf-8")
    elif not answers.hub_hostname and not answers.device_id and same:
        text = current[CONNECTION_STRING_FILE]
    else:
        text = ("HostName=" + _identity_part(answers.hub_hostname, "IoT Hub host name")
                + ";DeviceId=" + _identity_part(answers.device_id, "device id")
                + ";ModuleId=" + _identity_part(answers.module_id, "module id")
                + ";x509=true").encode("ascii")
    cert = key = None
    if answers.certificate_file:
        cert = read(answers.certificate_file, "certificate")
    elif same:
        cert = current.get(CERTIFICATE_FILE)
    if answers.private_key_file:
        key = read(answers.private_key_file, "private key")
    elif same:
        key = current.get(PRIVATE_KEY_FILE)
    if cert is None:
        raise ValidationError("certificate", "no certificate file given; enter the path of "
                              "the PEM certificate")
    if key is None:
        raise ValidationError("private key", "no private key file given; enter the path of "
                              "the PEM private key")
    return Inputs(method, text, cert, key)


def question_for(error: SetupError, answers: Answers) -> str:
    """The question whose answer caused ``error`` (the one the config script re-asks)."""
    text = f"{getattr(error, 'field', '')} {error.message}".lower()
    if "private key" in text:
        return "private-key-file"
    if "certificate" in text and "certificate method" not in text:
        return "certificate-file"
    if answers.method == "certificate" and not answers.connection_string:
        if "device" in text:
            return "device-id"
        if "module" in text:
            return "module-id"
        return "hub-hostname"
    if answers.method in ("connection-string", "certificate"):
        return "connection-string"
    return "auth-method"


def _split(error: SetupError) -> tuple[str, str]:
    """``(field, reason)`` of an error, one line each, for the shell and the error template."""
    if isinstance(error, ValidationError):
        field_name, reason = error.field, error.message
    else:  # e.g. "certificate file: /x does not exist"; unsafe targets start with a path
        head, sep, tail = error.message.partition(": ")
        if sep and len(head) <= 40 and not head.startswith("/"):
            field_name, reason = head, tail
        else:
            field_name, reason = "credentials", error.message
    return field_name, " ".join(reason.split())


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
        inputs = resolve(answers, AgentDir(root).current())
        if inputs is not None:
            _validate(inputs)
    except SetupError as exc:
        field_name, reason = _split(exc)
        return exc.exit_code, f"{question_for(exc, answers)}\t{field_name}\t{reason}"
    return EX_OK, ""


def _clear_one_shot(db) -> None:
    for name in ONE_SHOT:
        db.set(PREFIX + name, "")


def apply(db, root: Path, out) -> int:
    """Validate and write the answers (``apply --no-restart``); always clear the secrets."""
    from .agentdir import AgentDir

    agent = AgentDir(root)
    answers = None
    try:
        answers = Answers.read(db)
        current = agent.current()
        inputs = resolve(answers, current)
        if inputs is None:
            state = method_of(current)
            if state:  # unconfigured: the postinst says how to configure
                print(f"defender-setup: credentials unchanged ({state})", file=out)
            return EX_OK
        validated = _validate(inputs)
        for line in validated.summary_lines():
            print(f"  {line}", file=out)
        for warning in validated.warnings:
            print(f"defender-setup: warning: {warning}", file=out)
        with agent.lock():  # the writers' lock (exit 75 if another keeps it for 30 s)
            if {name: data for name, (data, _) in validated.files.items()} == agent.current():
                print("defender-setup: credentials unchanged (same as written before)",
                      file=out)
            else:
                agent.write(validated.files, origin="debconf")
                print(f"defender-setup: wrote {', '.join(sorted(validated.files))} in "
                      f"{agent.path}", file=out)
        ident = validated.connection_string
        # Keep debconf showing what is configured now (dpkg-reconfigure starts from it).
        db.set(PREFIX + "auth-method", validated.method)
        db.set(PREFIX + "hub-hostname", ident.host_name)
        db.set(PREFIX + "device-id", ident.device_id)
        db.set(PREFIX + "module-id", ident.module_id)
        return EX_OK
    except SetupError as exc:
        field_name, reason = _split(exc)
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

