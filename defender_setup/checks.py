"""``defender-setup check``: a diagnosis made of named checks (like ``aziotctl check``).

Interface::

    run_checks(root: Path, service_state: dict | None = None, lock_timeout=5, stored=None,
               clock=time.time) -> list[CheckResult]
    render(results) -> list[str]
    last_import(record) -> str; INTERRUPTED, UNCONFIGURED   # status says these alike

Read-only like ``status``: one snapshot of the stored set under the readers' shared lock
(``provision.read``: each sealed file decrypted once, the set validated once), which the
network checks (:mod:`.netcheck`) test too; an update left half done is reported, never
completed.

Each check has a stable id and a description, and collects its own problem; a failed check
makes later checks that depend on it ``skipped`` instead of failing with a cascade.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .agentdir import IMPORT_RECORD, AgentDir, when
from .connection_string import METHOD_CERTIFICATE
from .credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE, SEALED_NAMES
from .errors import EX_CONFIG, EX_NOPERM, EX_OK, EX_UNAVAILABLE, BusyError, SetupError

OK, WARNING, ERROR, SKIPPED = "ok", "warning", "error", "skipped"
_SECRETS = (CONNECTION_STRING_FILE, PRIVATE_KEY_FILE, *SEALED_NAMES.values())
# certificate-expiry: a warning under EXPIRY_WARNING_DAYS (certificates.EXPIRY_WARNING_DAYS,
# where validate warns too), an error under EXPIRY_ERROR_DAYS (aziotctl warns at 7).
EXPIRY_ERROR_DAYS = 7
# status words these states as check does
INTERRUPTED = ("an interrupted credential update is pending (the files may mix two sets); "
               "run 'defender-setup repair', or restart the service, to complete it")
UNCONFIGURED = "not configured: run 'dpkg-reconfigure defender-setup' or 'defender-setup apply'"


@dataclass(frozen=True)
class CheckResult:
    id: str
    description: str
    status: str
    message: str = ""
    exit_code: int = EX_OK

    def as_dict(self) -> dict:
        return asdict(self)


def run_checks(root: Path, service_state: dict | None = None, lock_timeout: float = 5.0,
               stored=None, clock=time.time) -> list[CheckResult]:
    """Run every check on one snapshot of the stored set (``provision.read``; ``stored``
    when the caller read it already, for the network checks to test the same set).

    :param clock: the time now in seconds since the epoch (tests pass a fixed one).

    :raises BusyError: a writer kept the lock for ``lock_timeout`` s.
    """
    from .provision import read

    results: list[CheckResult] = []

    def add(check_id, description, status, message="", code=EX_OK):
        results.append(CheckResult(check_id, description, status, message, code))
        return status in (OK, WARNING)

    agent = AgentDir(root)
    # Which agent the credentials are for (target.detect): the name and version, never an error.
    add("agent-in-use", "the micro agent the credentials are for", OK,
        f"{agent.target.describe()}, reading {agent.path}")
    description = "agent directory, files and private state are root's and not links"
    try:
        stored = stored if stored is not None else read(agent, lock_timeout)
        safe = add("agent-dir-safe", description, OK)
    except BusyError:
        raise
    except SetupError as exc:
        stored = None
        safe = add("agent-dir-safe", description, ERROR, str(exc), exc.exit_code)
    if stored is not None:
        if stored.pending:
            safe = add("no-interrupted-update", "no credential update was left half done",
                       ERROR, INTERRUPTED, EX_CONFIG)
        else:
            add("no-interrupted-update", "no credential update was left half done", OK)
    present = "connection_string.txt exists"
    if not safe:
        add("credentials-present", present, SKIPPED)
    elif stored.method is None:  # a connection string, plain or sealed
        add("credentials-present", present, ERROR, UNCONFIGURED, EX_CONFIG)
    else:
        add("credentials-present", present, OK)
        _check_modes(agent, stored.modes, add)
        if _check_sealed(stored, add):
            _check_credentials(stored, add)
        else:
            add("credentials-valid", "stored credentials pass validation", SKIPPED)
    _check_expiry(stored if safe else None, add, clock)
    _check_last_import(agent, add)
    if service_state is not None:
        active = service_state.get("active")
        status = SKIPPED if active is None else OK if active else ERROR
        add("service-active", "the service is active and not restarting", status,
            service_state.get("summary", ""), EX_UNAVAILABLE if status == ERROR else EX_OK)
    return results


def _check_modes(agent: AgentDir, modes: dict, add) -> None:
    loose = [name for name in _SECRETS if modes.get(str(agent.path / name), 0) & 0o077]
    if loose:
        add("secret-file-modes", "secret files are readable by root only", ERROR,
            f"{', '.join(loose)} readable by others: chmod 0600 them", EX_NOPERM)
    else:
        add("secret-file-modes", "secret files are readable by root only", OK)


def _check_sealed(stored, add) -> bool:
    """Sealed files decrypt here (with this machine's host key / TPM2); False when not."""
    from .sealing import PLAIN_LEFT, SEAL_UNIT

    description = "sealed secret files decrypt with this machine's key"
    how = stored.sealing
    if how.error:
        add("sealed-credentials", description, ERROR,
            f"{how.error}: the set was sealed on another machine (or its key changed); apply "
            "the credentials again", EX_CONFIG)
        return False
    if stored.seal_pending:
        add("sealed-credentials", description, WARNING, "sealing is deferred to the first "
            f"boot ({SEAL_UNIT}); run 'defender-setup seal' to seal now")
    elif how.sealed:
        left = stored.plain_left  # a plain copy behind a sealed set: seal it
        add("sealed-credentials", description, WARNING if left else OK, how.describe()
            + (", but " + PLAIN_LEFT.format(", ".join(left)) if left else ""))
    else:
        add("sealed-credentials", description, SKIPPED, "not sealed (plain root-only files)")
    return True


def _check_credentials(stored, add) -> None:
    description = f"stored {stored.method} credentials pass validation"
    try:
        validated = stored.loaded
    except SetupError as exc:
        add("credentials-valid", description, ERROR, str(exc), exc.exit_code)
        return
    c = validated.connection_string
    add("credentials-valid", description, OK, f"{c.device_id}/{c.module_id} on {c.host_name}")
    # the leaf's end is certificate-expiry's to report, not a second time here
    cert = validated.certificate
    warnings = [w for w in validated.warnings if cert is None or w != cert.expiry_warning]
    add("credentials-warnings", "nothing worth a warning (module id, CN, chain)",
        WARNING if warnings else OK, "; ".join(warnings))


def _check_expiry(stored, add, clock) -> None:
    """The leaf certificate's notAfter against the clock: an expiring certificate is a
    warning a month ahead and an error a week ahead, an expired one an error. It reads the
    dates alone, so a certificate that has expired (which validation refuses) is named too."""
    from .certificates import EXPIRY_WARNING_DAYS, validity

    description = (f"the certificate does not expire within {EXPIRY_WARNING_DAYS} days "
                   f"(an error within {EXPIRY_ERROR_DAYS})")
    if stored is None or stored.method is None:
        add("certificate-expiry", description, SKIPPED, "needs credentials-present")
        return
    if stored.method != METHOD_CERTIFICATE:
        add("certificate-expiry", description, SKIPPED,
            f"the {stored.method} method uses no certificate")
        return
    if CERTIFICATE_FILE not in stored.plain:
        add("certificate-expiry", description, SKIPPED, f"no {CERTIFICATE_FILE}")
        return
    try:
        not_after = validity(stored.plain[CERTIFICATE_FILE])[1]
    except SetupError:
        add("certificate-expiry", description, SKIPPED,
            f"{CERTIFICATE_FILE} cannot be read as a certificate (see credentials-valid)")
        return
    left = not_after - _dt.datetime.fromtimestamp(clock(), _dt.timezone.utc)
    shown = not_after.strftime("%Y-%m-%d %H:%M UTC")
    renew = ("issue a new certificate, register its thumbprint (or CA) on the hub and "
             "apply it ('defender-setup apply --certificate … --private-key …')")
    if left.total_seconds() <= 0:
        status, message = ERROR, f"the certificate expired {shown}"
    else:
        status = (ERROR if left < _dt.timedelta(days=EXPIRY_ERROR_DAYS) else
                  WARNING if left < _dt.timedelta(days=EXPIRY_WARNING_DAYS) else OK)
        message = f"the certificate expires in {_days(left.days)} ({shown})"  # rounded down
    if status != OK:  # and what to do about it
        message += f": {renew}"
    add("certificate-expiry", description, status, message,
        EX_CONFIG if status == ERROR else EX_OK)


def _days(days: int) -> str:
    return "less than a day" if days < 1 else f"{days} day{'s' * (days != 1)}"


def _check_last_import(agent: AgentDir, add) -> None:
    """The last boot-time import (defender-setup import): a refused or invalid offer stays
    visible here until a later import, or another way of configuring, succeeds."""
    description = "the last credentials offered at boot were imported"
    last = agent.record(IMPORT_RECORD)
    if last is None:
        add("last-import", description, SKIPPED, "no credentials were offered at boot")
        return
    origin, message = agent.origin() or {}, last_import(last)
    if last.get("result") in ("verified", "unchanged", "written"):
        add("last-import", description, OK, message)
    elif (when(origin.get("time")) or 0) > (when(last.get("time")) or 0):
        add("last-import", description, WARNING, f"{message} (since configured by "
            f"{origin.get('source')} at {origin.get('time')})")
    else:
        add("last-import", description, ERROR, message, last.get("exit_code", EX_CONFIG))


def last_import(last: dict) -> str:
    """The last boot-time import (its record) in one sentence, as check and status say it."""
    return (f"{last.get('result')} at {last.get('time')} from {last.get('source')}: "
            f"{last.get('message')}")


def render(results: list[CheckResult]) -> list[str]:
    marks = {OK: "[ ok ]", WARNING: "[warn]", ERROR: "[FAIL]", SKIPPED: "[skip]"}
    lines = []
    for r in results:
        lines.append(f"{marks[r.status]} {r.id}: {r.description}")
        if r.message:
            lines.append(f"    {r.message}")
    errors = sum(r.status == ERROR for r in results)
    warnings = sum(r.status == WARNING for r in results)
    lines.append(f"{len(results)} checks: {errors} errors, {warnings} warnings")
    return lines
