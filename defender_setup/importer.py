"""``defender-setup import``: give a device the identity it is offered at boot.

Interface::

    run(root, mode, *, timeout, out, environ=None, decrypt=None, service=None,
        clock=time.monotonic, sleep=time.sleep) -> exit code
        mode: "manual" (write, then restart and verify now), "no-restart" (write only),
              "boot" (defender-setup-import.service), "boot-verify"
              (defender-setup-import-verify.service)
    check_offer(offer, stored=NOTHING_STORED, now=None) -> Plan   # pure; ValidationError
    last_import(root) -> dict | None                        # the outcome record, no secrets

Every run: find the offer (:mod:`defender_setup.offer`); nothing offered, nothing done (a
configured device keeps its identity). Otherwise the set is validated with the rules of
``apply``; invalid gives one line naming the credential (or drop-folder file), the field and
the fix, and changes nothing. A set equal to the configured one writes and restarts nothing.
It is an adapter over the provisioning core (:mod:`defender_setup.provision`, then
:func:`defender_setup.verify.settle`): a new set is stored (the previous set kept), then the
agent is started and verified; a set the agent refuses (the hub rejected it: exit 76, or 78)
is rolled back to the previous set, or removed again when the device had none. An offer the
agent refused is not imported again at boot while it stays the same (each attempt would
restart the agent twice); ``import`` by hand tries it again. An offer holding a DPS ID
scope is an enrollment, not a set: :mod:`defender_setup.importdps` registers it (zero-touch).

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
from pathlib import Path

from . import UNIT, provision
from .agentdir import (
    IMPORT_RECORD,
    AgentDir,
    now,  # the same UTC format as the origin record: comparable
)
from .applying import Writing
from .credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PLAIN_FILES, PRIVATE_KEY_FILE
from .errors import EX_OK, EX_UNAVAILABLE, Field, ServiceError, SetupError, ValidationError
from .offer import (
    DPS_GROUP_KEY_FILE,
    DPS_SYMMETRIC_KEY_FILE,
    FIELD_OF,
    Offer,
    clear_folder,
    find_offer,
    note_rejection,
    searched,
    waiting_folder,
)

RECORD = IMPORT_RECORD
PENDING = "import.pending"  # defender-setup-import-verify.service's ConditionPathExists=
REFUSED = "import.refused"  # which offer the agent refused (a digest): not retried at boot
VERIFY_UNIT = "defender-setup-import-verify.service"
# An error's field -> the offered input it is about (two inputs hold a DPS key: see labelled).
FILE_OF = {field: name for name, field in FIELD_OF.items() if field != Field.DPS_KEY}
# Results after which an unchanged set need not be recorded again (no write at every boot).
SETTLED = ("verified", "unchanged", "written")
MODES = ("manual", "no-restart", "boot", "boot-verify")


# -- the pure part -----------------------------------------------------------------------
def check_offer(offer: Offer, stored=provision.NOTHING_STORED, now=None) -> provision.Plan:
    """Plan an offered set with the core's rules; errors name the offered input.

    :param stored: the stored set; a certificate and key offered without a connection
        string re-key a device configured for the certificate method.
    :raises ValidationError: its ``part`` names the credential or file (and the key).
    """
    files = offer.files
    request = provision.Request(files.get(CONNECTION_STRING_FILE), files.get(CERTIFICATE_FILE),
                                files.get(PRIVATE_KEY_FILE), origin=offer.source)
    try:
        return provision.plan(request, stored, now=now)
    except SetupError as exc:
        raise labelled(exc, offer) from None


def labelled(exc: SetupError, offer: Offer) -> SetupError:
    """``exc`` shown with the offered input it is about (``credential defender-setup.
    certificate: ...``, ``FOLDER/connection_string.txt: SharedAccessKey: ...``).

    A file of the set is named even when it is missing (it is the file to offer); a DPS input
    only when it was offered (an unset machine id is about no offered file), and by itself:
    its credential's name says what it is ("DPS enrollment group key" would repeat it).
    """
    name = FILE_OF.get(exc.field)
    if exc.field == Field.DPS_KEY:
        name = DPS_GROUP_KEY_FILE if DPS_GROUP_KEY_FILE in offer.files \
            else DPS_SYMMETRIC_KEY_FILE
    if name in PLAIN_FILES:
        where = offer.label(name)
        exc.part = f"{where}: {exc.part}" if exc.part else where
    elif name in offer.where:
        exc.part = offer.label(name)
    return exc


def _identity(plan: provision.Plan) -> dict:
    v = plan.validated
    c = v.connection_string
    return {"method": v.method, "hub": c.host_name, "device": c.device_id,
            "module": c.module_id}


def last_import(root: Path | str) -> dict | None:
    """The last import's outcome (``result``: unchanged, written, verified, rejected,
    invalid or failed), or None when nothing was ever offered."""
    return AgentDir(root).record(RECORD)


# -- the steps with side effects ----------------------------------------------------------
class _Run:
    def __init__(self, writing: Writing, service, timeout: float, clock, sleep):
        self.writing, self.agent, self.out = writing, writing.agent, writing.out
        self.root, self.wait = writing.agent.root, writing.timeout
        self.timeout, self.clock, self.sleep = timeout, clock, sleep
        self._service = service

    @property
    def svc(self):
        if self._service is None:
            from .service import Service

            self._service = Service(self.root)
        return self._service

    def say(self, line: str) -> None:
        print(f"{self.writing.prefix}{line}", file=self.out)

    @staticmethod
    def record_of(offer: Offer | None, **more) -> dict:
        """A new outcome record: where the offer came from (never its content)."""
        return {"time": now(), "source": offer and offer.source,
                "from": dict(offer.where) if offer else {}, "identity": None, **more}

    def save(self, record: dict, **changes) -> dict:
        record = dict(record, **changes)
        self.agent.save_record(RECORD, record)
        return record

    def find(self, environ, decrypt) -> Offer | None:
        try:
            offer = find_offer(self.root, environ, decrypt)
        except SetupError as exc:  # unreadable, too large, a link, cannot be decrypted
            partial = getattr(exc, "offer", None)  # where it came from (no content)
            self.fail(self.record_of(partial), exc, partial)
        if offer is None:
            self.say(f"nothing offered (looked for {searched(self.root)}); nothing to do")
            return None
        folder = waiting_folder(self.root) if offer.folder is None else None
        if folder is not None:
            self.say(f"warning: systemd credentials take precedence; {folder} is left as "
                     "it is (remove it, or offer no credential to import it)")
        return offer

    def refused_before(self, offer: Offer) -> bool:
        """True (and said) when the agent refused this very offer before: at boot it is not
        imported again (two restarts and a roll-back at every boot, for the same answer)."""
        seen = self.agent.record(REFUSED)
        if seen is None or seen.get("digest") != provision.digest(offer.files):
            return False
        self.say(f"{offer.describe()} hold the credentials the agent refused at "
                 f"{seen.get('time')}; not imported again at boot (offer other credentials, "
                 "or run 'defender-setup import' to try these again)")
        return True

    def judge(self, offer: Offer, stored) -> tuple[dict, provision.Plan]:
        record = self.record_of(offer)
        try:
            p = check_offer(offer, stored)
        except SetupError as exc:
            self.fail(record, exc, offer)
        return dict(record, identity=_identity(p)), p

    def keep(self, offer: Offer, record: dict) -> int:
        ident = record["identity"]
        self.say(f"{offer.describe()} hold the configured {ident['method']} credentials for "
                 f"{ident['device']}/{ident['module']} on {ident['hub']}; nothing written, "
                 "nothing restarted")
        return self.unchanged(offer, record, "equal to the configured set", "already imported")

    def unchanged(self, offer: Offer, record: dict, message: str, why: str) -> int:
        """An offer already in place: recorded once (an ordinary boot writes nothing), its
        drop folder emptied unless a verification still waits for it."""
        previous = self.agent.record(RECORD) or {}
        if previous.get("result") not in SETTLED or previous.get("source") != offer.source:
            self.save(record, result="unchanged", message=message)
        if offer.folder is not None and self.agent.record(PENDING) is None:
            self.clear(offer.folder, why, record)
        return EX_OK

    def start(self, mode: str, record: dict, digest: str | None) -> int:
        """After a set was written (or at boot-verify): restart and verify it, queue the
        agent's start at boot, or say why not (``--no-restart``, an image build, no agent).
        ``digest`` names the offer (kept apart when it is refused)."""
        skip = "--no-restart" if mode == "no-restart" else self.svc.skip_reason()
        if skip:
            what = "verification" if mode == "boot-verify" else "restart"
            self.say(f"{what} skipped: {skip}")
            return EX_OK
        if self.agent_missing():
            return EX_OK
        if mode == "boot":
            return self._queue_start(record, digest)
        from .verify import settle

        # boot-verify (no restart) runs at every boot: DPS re-provisioning once a boot
        restart = mode != "boot-verify"
        result = settle(self.root, timeout=self.timeout, strict=True, out=self.out,
                        restart=restart, service=self.svc, clock=self.clock, sleep=self.sleep,
                        boot=not restart)
        return self._settled(result, record, digest)

    def _queue_start(self, record: dict, digest: str | None) -> int:
        """At boot: mark the set for the verify unit and queue the agent's start (never wait
        for it: the agent is ordered after this unit)."""
        with self.agent.lock(self.wait):  # free when the caller holds it (not the DPS import)
            self.agent.save_record(PENDING, {"time": record["time"], "digest": digest})
        self.svc.reset_failed()
        try:
            self.svc.queue_restart()
        except ServiceError as exc:  # reported; the verify unit still judges what runs
            self.say(f"warning: {exc}")
            return EX_OK
        self.say(f"{UNIT} (re)start queued; {VERIFY_UNIT} verifies it once it has started")
        return EX_OK

    def fail(self, record: dict, exc: SetupError, offer: Offer | None = None,
             result: str | None = None):
        """Record the failure (``result``: invalid input, else failed), leave a note in a
        drop folder, raise it as one line."""
        result = result or ("invalid" if isinstance(exc, ValidationError) else "failed")
        message = f"{exc}; nothing was changed"
        self.save(record, result=result, message=message, exit_code=exc.exit_code)
        if offer is not None and offer.folder is not None:
            try:
                note_rejection(offer.folder, message)
            except SetupError as note_error:
                self.say(f"warning: {note_error}")
        # Already recorded: raised again as one line, with the original exit code.
        reported = SetupError(message)
        reported.exit_code = exc.exit_code
        raise reported

    def clear(self, folder: Path, why: str, record: dict) -> None:
        try:
            removed = clear_folder(folder)
        except SetupError as exc:  # e.g. a read-only /boot: the secret stays readable there
            self.save(record, result="failed", message=f"{why}, but {exc}",
                      exit_code=exc.exit_code)
            raise
        if removed:
            self.say(f"removed {', '.join(removed)} from {folder} ({why})")

    def _settled(self, result, record: dict, digest: str | None) -> int:
        """Record the core's verdict on a set just written (``verify.Result``); ``digest``
        names the offer, kept apart (REFUSED) when it is refused: status shows the record."""
        from .verify import SKIPPED

        self.agent.drop_record(PENDING)
        if result.outcome == SKIPPED:
            return result.code
        if result.ok:
            return self.verified(record, result.message, "imported and verified")
        message = self.rejected(record, result.message, EX_UNAVAILABLE, digest)
        self.say(f"VERIFICATION FAILED: {message}")
        if record.get("folder"):
            note_rejection(Path(record["folder"]), message)
        return EX_UNAVAILABLE

    def verified(self, record: dict, message: str, why: str) -> int:
        """Record an offer the agent runs with; its drop folder is emptied (``why``)."""
        self.save(record, result="verified", message=message)
        self.agent.drop_record(REFUSED)
        if record.get("folder"):
            self.clear(Path(record["folder"]), why, record)
        return EX_OK

    def rejected(self, record: dict, why: str, code: int, digest: str | None) -> str:
        """Record an offer the agent refused, kept apart by its digest (REFUSED); the
        message, which says it is not imported again at boot."""
        message = (f"{why}; not imported again at boot while the offer stays the same (run "
                   "'defender-setup import' to try it again)")
        # Dated at the verdict: the roll-back (or unconfigure) just written is part of it,
        # not a later configuration that would supersede the refusal (check: last-import).
        self.save(record, result="rejected", message=message, exit_code=code, time=now())
        if digest:
            self.agent.save_record(REFUSED, {"digest": digest, "time": record["time"]})
        return message

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
    job = _Run(Writing(root, out, lock_timeout, prefix="defender-setup import: "),
               service, timeout, clock, sleep)
    if mode == "boot-verify":
        if job.agent.record(PENDING) is None:
            return EX_OK
        with job.agent.lock(job.wait):
            digest = (job.agent.record(PENDING) or {}).get("digest")
            record = job.agent.record(RECORD) or {"time": now(), "source": None}
            return job.start(mode, record, digest)
    offer = job.find(environ, decrypt)
    if offer is None or (mode == "boot" and job.refused_before(offer)):
        return EX_OK
    if offer.dps:
        from .importdps import run_dps

        return run_dps(job, mode, offer)
    # Read-only first (no lock file created): an ordinary boot, offered the configured set,
    # writes nothing at all.
    record, p = job.judge(offer, provision.read(job.agent, job.wait))
    if p.unchanged:
        return job.keep(offer, record)
    with job.writing:
        return _import(job, mode, offer, record, p)


def _import(job: _Run, mode: str, offer: Offer, record: dict, p: provision.Plan) -> int:
    for warning in p.validated.warnings:
        job.say(f"warning: {warning}")
    try:
        written = provision.commit(job.agent, p)
    except SetupError as exc:
        job.fail(record, exc, offer, "failed")  # whatever went wrong while writing
    if not written:
        return job.keep(offer, record)
    record = job.save(record, result="written", message="verification pending",
                      folder=str(offer.folder) if offer.folder else None)
    digest = provision.digest(offer.files)
    ident = record["identity"]
    kept = " (the previous set kept for rollback)" if job.agent.has_previous() else ""
    job.say(f"imported {ident['method']} credentials for {ident['device']}/"
            f"{ident['module']} on {ident['hub']} from {offer.describe()} into "
            f"{job.agent.path}{kept}")
    return job.start(mode, record, digest)
