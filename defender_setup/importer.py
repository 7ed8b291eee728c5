"""``defender-setup import``: give a device the identity it is offered at boot.

Interface::

    run(root, mode, *, timeout, out, environ=None, decrypt=None, service=None,
        clock=time.monotonic, sleep=time.sleep) -> exit code
        mode: "manual" (write, then restart and verify now), "no-restart" (write only),
              "boot" (defender-setup-import.service), "boot-verify"
              (defender-setup-import-verify.service)
    check_offer(offer, current, now=None) -> Validated     # pure; raises ValidationError
    last_import(root) -> dict | None                        # the outcome record, no secrets

Every run: find the offer (:mod:`defender_setup.offer`); nothing offered, nothing done (a
configured device keeps its identity). Otherwise the set is validated with the rules of
``apply``; invalid gives one line naming the credential (or drop-folder file), the field and
the fix, and changes nothing. A set equal to the configured one writes and restarts nothing.
A new set goes through :meth:`AgentDir.write` (the previous set kept), then the agent is
started and verified; a set the agent refuses (the hub rejected it: exit 76, or 78) is rolled
back to the previous set, or removed again when the device had none.

Why two boot steps: defender-setup-import.service is ordered Before= the agent, so the agent's
start job waits for it. A synchronous ``systemctl restart`` of the agent from there would wait
for that job, which waits for the import: both hang until a timeout. So at boot the import
only writes, queues the agent's restart with ``--no-block`` (merged into its pending start at
boot; a real restart when the import is run again later) and leaves a marker;
defender-setup-import-verify.service, ordered after the agent, watches it and rolls back.

The outcome (source, time, paths, identity, result, message; never a secret) is kept in the
agent directory's private state (``import.json``) for ``status --json`` and ``check``.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from . import UNIT
from . import connection_string as cs
from .agentdir import (
    IMPORT_RECORD,
    WRITE_WAIT,
    AgentDir,
    _now,  # the same UTC format as the origin record: comparable
)
from .credentials import (
    CERTIFICATE_FILE,
    CONNECTION_STRING_FILE,
    PRIVATE_KEY_FILE,
    Validated,
    method_of,
    validate,
)
from .errors import (
    CERTIFICATE,
    EX_OK,
    EX_UNAVAILABLE,
    PRIVATE_KEY,
    ServiceError,
    SetupError,
    ValidationError,
)
from .offer import (
    Offer,
    clear_folder,
    find_offer,
    note_rejection,
    searched,
    waiting_folder,
)

RECORD = IMPORT_RECORD
PENDING = "import.pending"  # defender-setup-import-verify.service's ConditionPathExists=
VERIFY_UNIT = "defender-setup-import-verify.service"
# ValidationError.field -> the input it is about; every other field is the connection string's.
_FILE_OF_FIELD = {CERTIFICATE: CERTIFICATE_FILE, PRIVATE_KEY: PRIVATE_KEY_FILE}
# Results after which an unchanged set need not be recorded again (no write at every boot).
_SETTLED = ("verified", "unchanged", "written")
MODES = ("manual", "no-restart", "boot", "boot-verify")


# -- the pure part -----------------------------------------------------------------------
def check_offer(offer: Offer, current: dict, now: datetime | None = None) -> Validated:
    """Validate an offered set as a whole (the same rules as ``apply``).

    :param current: the files configured now; a certificate and key offered without a
        connection string re-key a device configured for the certificate method.
    :raises ValidationError: ``field`` names the input (credential or file) and the field.
    """
    files = dict(offer.files)
    label = offer.label
    text = files.get(CONNECTION_STRING_FILE)
    has_cert, has_key = CERTIFICATE_FILE in files, PRIVATE_KEY_FILE in files
    if text is None:
        if (has_cert or has_key) and method_of(current) == cs.METHOD_CERTIFICATE:
            text = current[CONNECTION_STRING_FILE]  # a new certificate for the same identity
        else:
            raise ValidationError(label(CONNECTION_STRING_FILE), "is missing; offer the "
                                  "module's connection string (SharedAccessKey=..., or "
                                  "x509=true with the certificate and its key)")
    try:
        parsed = cs.parse(text)
    except ValidationError as exc:
        raise ValidationError(f"{label(CONNECTION_STRING_FILE)}: {exc.field}",
                              exc.message) from None
    if parsed.x509:
        if not has_cert and not has_key:
            raise ValidationError(label(CERTIFICATE_FILE), "is missing: the connection string "
                                  f"says x509=true; offer the PEM certificate and its private "
                                  f"key too ({label(PRIVATE_KEY_FILE)})")
        if not has_key:
            raise ValidationError(label(PRIVATE_KEY_FILE), "is missing: a certificate was "
                                  "offered without its private key; offer both")
        if not has_cert:
            raise ValidationError(label(CERTIFICATE_FILE), "is missing: a private key was "
                                  "offered without its certificate; offer both")
        method = cs.METHOD_CERTIFICATE
    else:
        if has_cert or has_key:
            extra = label(CERTIFICATE_FILE if has_cert else PRIVATE_KEY_FILE)
            raise ValidationError(f"{label(CONNECTION_STRING_FILE)}: authentication method",
                                  f"the connection string uses SharedAccessKey but {extra} was "
                                  "offered too; for a certificate end the connection string "
                                  "with x509=true instead, for SharedAccessKey offer no "
                                  "certificate or key")
        method = cs.METHOD_CONNECTION_STRING
    try:
        return validate(method, text, files.get(CERTIFICATE_FILE), files.get(PRIVATE_KEY_FILE),
                        now=now)
    except ValidationError as exc:
        where = label(_FILE_OF_FIELD.get(exc.field, CONNECTION_STRING_FILE))
        field = "" if exc.field in _FILE_OF_FIELD else f": {exc.field}"
        raise ValidationError(f"{where}{field}", exc.message) from None


def _same(validated: Validated, current: dict) -> bool:
    return {name: data for name, (data, _mode) in validated.files.items()} == current


def _identity(validated: Validated) -> dict:
    c = validated.connection_string
    return {"method": validated.method, "hub": c.host_name, "device": c.device_id,
            "module": c.module_id}


def last_import(root: Path | str) -> dict | None:
    """The last import's outcome (``result``: unchanged, written, verified, rejected,
    invalid or failed), or None when nothing was ever offered."""
    return AgentDir(root).record(RECORD)


# -- the steps with side effects ----------------------------------------------------------
class _Run:
    def __init__(self, root: Path, out, service, timeout: float, clock, sleep):
        self.root, self.out, self.timeout = root, out, timeout
        self.clock, self.sleep = clock, sleep
        self.agent = AgentDir(root)
        self._service = service

    @property
    def svc(self):
        if self._service is None:
            from .service import Service

            self._service = Service(self.root)
        return self._service

    def say(self, line: str) -> None:
        print(f"defender-setup import: {line}", file=self.out)

    def save(self, record: dict, **changes) -> dict:
        record = dict(record, **changes)
        self.agent.save_record(RECORD, record)
        return record

    # -- import ---------------------------------------------------------------------------
    def find(self, environ, decrypt) -> Offer | None:
        try:
            offer = find_offer(self.root, environ, decrypt)
        except SetupError as exc:  # unreadable, too large, a link, cannot be decrypted
            partial = getattr(exc, "offer", None)  # where it came from (no content)
            self._fail({"time": _now(), "source": partial and partial.source,
                        "from": dict(partial.where) if partial else {}, "identity": None},
                       "invalid" if isinstance(exc, ValidationError) else "failed", exc,
                       partial)
        if offer is None:
            self.say(f"nothing offered (looked for {searched(self.root)}); nothing to do")
            return None
        folder = waiting_folder(self.root) if offer.folder is None else None
        if folder is not None:
            self.say(f"warning: systemd credentials take precedence; {folder} is left as "
                     "it is (remove it, or offer no credential to import it)")
        return offer

    def _judge(self, offer: Offer):
        """(record, validated, current) for an offer; raises ValidationError/SetupError."""
        from .sealing import open_set

        current = open_set(self.agent.current())[0]  # a sealed set is compared decrypted
        validated = check_offer(offer, current)
        record = {"time": _now(), "source": offer.source, "from": dict(offer.where),
                  "identity": _identity(validated)}
        return record, validated, current

    def unchanged(self, offer: Offer) -> bool:
        """Read-only, before any lock: True (and done) when the offer equals the configured
        set, so that an ordinary boot writes nothing at all, not even the lock file. Any
        doubt (invalid, interrupted update) goes to :meth:`import_offer` under the lock."""
        try:
            record, validated, current = self._judge(offer)
        except SetupError:
            return False
        if not _same(validated, current) or self.agent.pending():
            return False
        self._keep(offer, record, validated)
        return True

    def _keep(self, offer: Offer, record: dict, validated: Validated) -> None:
        ident = record["identity"]
        self.say(f"{offer.describe()} hold the configured {validated.method} credentials for "
                 f"{ident['device']}/{ident['module']} on {ident['hub']}; nothing written, "
                 "nothing restarted")
        previous = self.agent.record(RECORD) or {}
        if previous.get("result") not in _SETTLED or previous.get("source") != offer.source:
            self.save(record, result="unchanged", message="equal to the configured set")
        if offer.folder is not None and self.agent.record(PENDING) is None:
            self.clear(offer.folder, "already imported", record)

    def import_offer(self, offer: Offer) -> tuple[dict, bool]:
        """Validate, compare, write (under the lock). Returns (record, written)."""
        try:
            record, validated, current = self._judge(offer)
        except SetupError as exc:
            record = {"time": _now(), "source": offer.source, "from": dict(offer.where),
                      "identity": None}
            self._fail(record, "invalid" if isinstance(exc, ValidationError) else "failed",
                       exc, offer)
        for warning in validated.warnings:
            self.say(f"warning: {warning}")
        if _same(validated, current) and not self.agent.pending():
            self._keep(offer, record, validated)
            return record, False
        try:
            from .sealing import kept_sealed, store

            store(self.agent, validated.files, validated.method, kept_sealed(self.agent),
                  origin=offer.source)
        except SetupError as exc:
            self._fail(record, "failed", exc, offer)
        record = self.save(record, result="written", message="verification pending",
                           folder=str(offer.folder) if offer.folder else None)
        ident = record["identity"]
        kept = " (the previous set kept for rollback)" if self.agent.has_previous() else ""
        self.say(f"imported {validated.method} credentials for {ident['device']}/"
                 f"{ident['module']} on {ident['hub']} from {offer.describe()} into "
                 f"{self.agent.path}{kept}")
        return record, True

    def _fail(self, record: dict, result: str, exc: SetupError, offer: Offer | None = None):
        """Record the failure, leave a note in a drop folder, raise it as one line."""
        message = f"{exc}; nothing was changed"
        self.save(record, result=result, message=message, exit_code=exc.exit_code)
        if offer is not None and offer.folder is not None:
            try:
                note_rejection(offer.folder, message)
            except SetupError as note_error:
                self.say(f"warning: {note_error}")
        raise _Reported(exc, message)

    def clear(self, folder: Path, why: str, record: dict) -> None:
        try:
            removed = clear_folder(folder)
        except SetupError as exc:  # e.g. a read-only /boot: the secret stays readable there
            self.save(record, result="failed", message=f"{why}, but {exc}",
                      exit_code=exc.exit_code)
            raise
        if removed:
            self.say(f"removed {', '.join(removed)} from {folder} ({why})")

    # -- verification -----------------------------------------------------------------------
    def settle(self, verdict, record: dict) -> int:
        """Judge the agent's verdict on a set just written: keep it, or go back."""
        from .verify import _healthy_line, _print_journal

        folder = Path(record["folder"]) if record.get("folder") else None
        if verdict.ok:
            status = verdict.state.status_text
            print(_healthy_line(self.svc.unit, verdict), file=self.out)
            self.save(record, result="verified", message=status or "active and stable")
            self.agent.drop_record(PENDING)
            if folder is not None:
                self.clear(folder, "imported and verified", record)
            return EX_OK
        print(f"VERIFICATION FAILED: {self.svc.unit} {verdict.reason}", file=self.out)
        _print_journal(self.svc, verdict, self.out)
        reason = f"the agent refused the imported credentials: {verdict.reason}"
        if self.agent.has_previous():
            self.agent.rollback()
            from .verify import restart_once

            again = restart_once(self.svc, self.timeout, clock=self.clock, sleep=self.sleep)
            outcome = ("rolled back to the previous credentials, " +
                       ("service healthy" if again.ok else f"which fail too: {again.reason}"))
        else:
            self.agent.unconfigure()
            self.svc.reset_failed()  # unconfigured again: quiet, as before the import
            outcome = "removed them again: the device is unconfigured, as before"
        message = f"{reason}; {outcome}"
        self.say(f"VERIFICATION FAILED: {message}")
        self.save(record, result="rejected", message=message, exit_code=EX_UNAVAILABLE)
        self.agent.drop_record(PENDING)
        if folder is not None:
            note_rejection(folder, message)
        return EX_UNAVAILABLE

    def agent_missing(self) -> bool:
        """True (and said) when the agent's unit is masked or not installed: nothing to
        start or verify, and no reason to roll back."""
        loaded = self.svc.show().load_state
        if loaded in ("masked", "not-found"):
            self.say(f"{UNIT} is {loaded}: not started, the imported credentials are not "
                     "verified")
            self.agent.drop_record(PENDING)
            return True
        return False


class _Reported(SetupError):
    """An import failure already recorded; carries the original exit code and one line."""

    def __init__(self, exc: SetupError, message: str):
        super().__init__(message)
        self.exit_code = exc.exit_code


def run(root: Path | str, mode: str, *, timeout: float, out, environ=None, decrypt=None,
        service=None, clock=time.monotonic, sleep=time.sleep, lock_timeout=None) -> int:
    """One import in ``mode`` (see the module docstring); returns the exit code.

    Holds the writers' lock from the first write to the verdict, and takes it only when
    there is something to do: a device offered nothing gets no agent directory at all.
    :raises SetupError: an invalid or unreadable offer (already recorded), exit 65/66/77...;
        BusyError (75) when another writer keeps the lock ``lock_timeout`` seconds.
    """
    if mode not in MODES:
        raise ValueError(mode)
    job = _Run(Path(root), out, service, timeout, clock, sleep)
    wait = WRITE_WAIT if lock_timeout is None else lock_timeout
    if mode == "boot-verify":
        if job.agent.record(PENDING) is None:
            return EX_OK
        with job.agent.lock(wait):
            return _boot_verify(job)
    offer = job.find(environ, decrypt)
    if offer is None or job.unchanged(offer):
        return EX_OK
    with job.agent.lock(wait):
        if job.agent.repair():
            job.say("repaired: an interrupted credential update was completed")
        return _import(job, mode, offer)


def _import(job: _Run, mode: str, offer: Offer) -> int:
    record, written = job.import_offer(offer)
    if not written:
        return EX_OK
    skip = None if mode == "no-restart" else job.svc.skip_reason()
    if mode == "no-restart" or skip:
        job.say(f"restart skipped: {skip or '--no-restart'}")
        return EX_OK
    if job.agent_missing():
        return EX_OK
    if mode == "boot":
        job.agent.save_record(PENDING, {"time": record["time"]})
        job.svc.reset_failed()
        try:
            job.svc.queue_restart()
        except ServiceError as exc:  # reported; the verify unit still judges what runs
            job.say(f"warning: {exc}")
            return EX_OK
        job.say(f"{UNIT} (re)start queued; {VERIFY_UNIT} verifies it once it has started")
        return EX_OK
    from .verify import restart_once

    return job.settle(restart_once(job.svc, job.timeout, clock=job.clock, sleep=job.sleep),
                      record)


def _boot_verify(job: _Run) -> int:
    from .verify import watch

    record = job.agent.record(RECORD) or {"time": _now(), "source": None}
    skip = job.svc.skip_reason()
    if skip:
        job.say(f"verification skipped: {skip}")
        return EX_OK
    if job.agent_missing():
        return EX_OK
    return job.settle(watch(job.svc, job.timeout, clock=job.clock, sleep=job.sleep), record)
