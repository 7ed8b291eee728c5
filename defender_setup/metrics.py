"""Prometheus textfile metrics: ``defender_setup.prom`` for node_exporter's textfile collector.

Interface::

    textfile_dir(root) -> Path | None     # root/var/lib/prometheus/node-exporter, if it exists
    collect(root, lock_timeout=5) -> dict # read-only: the stored set, the LOCAL checks, the
                                          # records, the service state (BusyError: 75)
    render(facts: dict) -> str            # pure: the exposition text (# HELP, # TYPE)
    write(directory, text) -> Path        # temporary file + rename, 0644, never via a link
    refresh(root, err=sys.stderr) -> bool # collect + write when the directory exists; never
                                          # raises (a metrics problem never fails a command)

Who calls it: ``defender-setup metrics`` (``defender-setup-metrics.timer``, every 5 minutes)
and the end of every command that changes or verifies the set, at one place: the release of
the writers' lock (:meth:`defender_setup.agentdir.AgentDir.lock`), which apply, rollback,
seal/unseal, restart, import, repair and the debconf bridge all hold around their work.

Only the local checks run (:func:`defender_setup.checks.run_checks`), never the network
checks of :mod:`defender_setup.netcheck`: ``hub-auth`` connects as the stored identity, and
IoT Hub allows one connection per identity, so a timer running it would knock the agent off
the hub every 5 minutes. "Connected" is the agent's own status text, as systemd has it.

Low cardinality by construction: every label value comes from a fixed set (methods, origins,
results, check statuses) or is our own version or check id, checked against a short pattern;
no path, message, identity or secret is ever a label or a value.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from . import __version__
from . import facts as public
from .credentials import METHODS
from .errors import SetupError

TEXTFILE_DIR = "var/lib/prometheus/node-exporter"  # Debian's prometheus-node-exporter
FILE_NAME = "defender_setup.prom"  # the collector reads *.prom only: the .tmp is never read
MODE = 0o644                        # node_exporter runs as its own user
PREFIX = "defender_setup_"

ORIGINS = (*public.ORIGINS, "seal", "unseal")
# verify.settle's outcomes, as label values.
VERIFICATIONS = tuple(outcome.replace(" ", "_") for outcome in public.OUTCOMES)
# The last change, judged by the verification that followed it (none yet: unverified).
CHANGES = ("verified", "rolled_back", "unconfigured", "failed", "unverified")
CHECK_STATUSES = ("ok", "warning", "error", "skipped")
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}\Z")
_VERSION = re.compile(r"[0-9A-Za-z.+~:-]{1,32}\Z")
MAX_CHECKS = 64


def textfile_dir(root: Path | str) -> Path | None:
    """node_exporter's textfile directory under ``root``, or None when it does not exist
    (node_exporter is not installed: nothing is written). Under a ``root`` other than ``/``
    a link on the way is refused (None): it could lead out of the tree."""
    root = Path(root)
    path = root / TEXTFILE_DIR
    if not path.is_dir():
        return None
    if root.resolve() != Path("/") and path.resolve() != root.resolve() / TEXTFILE_DIR:
        return None  # a component of TEXTFILE_DIR is a link
    return path


# -- collecting (read-only) ----------------------------------------------------------------
def collect(root: Path | str, lock_timeout: float = 5.0) -> dict:
    """The facts :func:`render` turns into text, read under the readers' shared lock.

    :raises BusyError: a writer kept the lock ``lock_timeout`` seconds (it refreshes the
        metrics itself when it ends).
    """
    from .agentdir import COUNTERS, AgentDir, when
    from .checks import run_checks
    from .errors import BusyError
    from .provision import read
    from .service import Service

    root = Path(root)
    agent = AgentDir(root)
    state = Service(root).state()
    try:
        stored = read(agent, lock_timeout)
    except BusyError:
        raise
    except SetupError:
        stored = None  # check agent-dir-safe says why
    results = run_checks(root, state, lock_timeout, stored=stored)
    facts = {"version": __version__, "method": None, "sealed": None, "origin": None,
             "certificate_not_after": None, "service": state,
             "verification": _verification(public.read(root).last_verification),
             "rollbacks": (agent.record(COUNTERS) or {}).get("rollbacks", 0),
             "checks": [r.as_dict() for r in results]}
    if stored is not None:
        facts["origin"] = stored.origin
        if not stored.pending:
            facts["method"] = stored.method
            facts["sealed"] = stored.sealed if stored.method else None
        try:
            cert = stored.loaded.certificate if stored.method else None
        except SetupError:
            cert = None  # check credentials-valid says why
        if cert is not None:
            facts["certificate_not_after"] = cert.not_after.timestamp()
    for name in ("origin", "verification"):
        if facts[name] is not None:
            facts[name] = dict(facts[name], timestamp=when(facts[name].get("time")))
    return facts


def _verification(last: dict | None) -> dict | None:
    """The last verification as the public facts (:mod:`.facts`, the one record of it) say,
    in verify.settle's words, which the metrics' labels use."""
    if not last:
        return None
    words = {word: outcome for outcome, word in public.OUTCOMES.items()}
    return {"time": last.get("time"), "result": words.get(last.get("result"), last.get("result"))}


# -- rendering (pure) ----------------------------------------------------------------------
def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _one_of(value, allowed, other: str = "other") -> str:
    return value if value in allowed else other


def _number(value) -> str:
    if isinstance(value, int):  # a bool too: 1 or 0
        return str(int(value))
    return repr(float(value))


def _states(label: str, states, current, extra: dict | None = None) -> list:
    """A StateSet: one sample per possible state, 1 for the current one (bounded)."""
    return [({**(extra or {}), label: s}, int(s == current)) for s in states]


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples) -> None:
        """One metric family: ``samples`` is ``[(labels dict, value)]``; none, nothing."""
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return
        self.lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
        for labels, value in samples:
            inner = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
            self.lines.append(f"{PREFIX}{name}{'{' + inner + '}' if inner else ''} "
                              f"{_number(value)}")


def _last_change(origin: dict | None, verification: dict | None) -> str | None:
    """The last change judged by the verification after it: a roll-back (or unconfigure)
    written by a verification is part of it, so it counts as that verification's result."""
    if origin is None or origin.get("timestamp") is None:
        return None
    if verification is None or (verification.get("timestamp") or 0) < origin["timestamp"]:
        return "unverified"
    result = _verdict(verification)
    return "verified" if result == "healthy" else result


def _verdict(verification: dict) -> str:
    """The verification's result as a label value (one of :data:`VERIFICATIONS`)."""
    return _one_of(str(verification.get("result", "")).replace(" ", "_"), VERIFICATIONS,
                   "failed")


def render(facts: dict) -> str:
    """The exposition text for ``facts`` (:func:`collect`'s shape); pure."""
    t = _Text()
    origin = facts.get("origin") or None
    method = facts.get("method")
    version = facts.get("version") or ""
    t.metric("info", "gauge", "The package version, the authentication method and where the "
             "stored set came from (always 1).",
             [({"version": version if _VERSION.match(version) else "other",
                "method": _one_of(method, METHODS, "none"),
                "origin": "none" if origin is None else _one_of(origin.get("source"),
                                                                 ORIGINS)}, 1)])
    t.metric("configured", "gauge", "1 when credentials are stored (a connection string, "
             "plain or sealed), else 0.", [({}, int(bool(method)))])
    if facts.get("sealed") is not None:
        t.metric("credentials_sealed", "gauge", "1 when the secret files are sealed with the "
                 "machine's key (or waiting for the first boot to be), else 0.",
                 [({}, int(bool(facts["sealed"])))])
    service = facts.get("service")
    if service is not None and service.get("active") is not None:  # None: not asked
        active = bool(service.get("active"))
        text = str(service.get("status_text") or "")
        t.metric("agent_active", "gauge", "1 when the agent's unit is active and running.",
                 [({}, int(active))])
        t.metric("agent_connected", "gauge", "1 when the running agent reports a connection "
                 "to the hub (its unit's status text), else 0.",
                 [({}, int(active and text.startswith("connected to ")))])
    if origin is not None:
        t.metric("last_change_timestamp_seconds", "gauge", "When the stored set last changed "
                 "(any way in, roll-backs included), seconds since the epoch.",
                 [({}, origin.get("timestamp"))])
    change = _last_change(origin, facts.get("verification"))
    if change is not None:
        t.metric("last_change_result", "gauge", "The last change as its verification judged "
                 "it (1 for the current result): verified, rolled_back, unconfigured, failed, "
                 "or unverified (no verification since, e.g. no systemd or --no-restart).",
                 _states("result", CHANGES, change))
    verification = facts.get("verification")
    if verification is not None and verification.get("timestamp") is not None:
        t.metric("last_verification_timestamp_seconds", "gauge", "When the service was last "
                 "verified after a restart, seconds since the epoch.",
                 [({}, verification["timestamp"])])
        t.metric("last_verification_result", "gauge", "The last verification's outcome (1 for "
                 "the current one): healthy, rolled_back, unconfigured or failed.",
                 _states("result", VERIFICATIONS, _verdict(verification)))
    t.metric("certificate_expiry_timestamp_seconds", "gauge", "The stored certificate's "
             "notAfter (certificate method only), seconds since the epoch.",
             [({}, facts.get("certificate_not_after"))])
    rollbacks = facts.get("rollbacks")
    t.metric("rollbacks_total", "counter", "Roll-backs to the previous set of credentials "
             "(by a failed verification or 'defender-setup rollback').",
             [({}, rollbacks if isinstance(rollbacks, int) and rollbacks >= 0 else 0)])
    samples = []
    for check in (facts.get("checks") or [])[:MAX_CHECKS]:
        cid = str(check.get("id", ""))
        if _ID.match(cid):
            samples += _states("status", CHECK_STATUSES,
                                   _one_of(check.get("status"), CHECK_STATUSES, "error"),
                                   {"check": cid})
    t.metric("check_status", "gauge", "Each local check of 'defender-setup check' by id (1 for "
             "its current status); the network checks never run here.", samples)
    return "\n".join(t.lines) + "\n"


# -- writing ---------------------------------------------------------------------------------
def write(directory: Path, text: str) -> Path:
    """``directory/defender_setup.prom``, atomically: ``.prom.tmp`` created ``O_EXCL|
    O_NOFOLLOW`` with mode 0644 (a link planted at that name is unlinked, never followed),
    fsync-ed, renamed over the target (which replaces a link there, never writes through it).
    :raises WriteError: (73) the directory is not writable."""
    from .errors import WriteError
    from .safefs import replace

    path = Path(directory) / FILE_NAME
    try:
        replace(path, text.encode("utf-8"), MODE)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None
    return path


def refresh(root: Path | str, err=None) -> bool:
    """Write the metrics when node_exporter's directory exists; False when it does not.

    Never raises: the credentials were changed (or verified) already, and a metrics file
    that cannot be written must not turn that into a failure. One warning line instead.
    """
    directory = textfile_dir(root)
    if directory is None:
        return False
    try:
        write(directory, render(collect(root)))
    except SetupError as exc:
        _warn(err, f"metrics not written: {exc}")
    except Exception as exc:  # a bug: the type only (a message could quote an input)
        _warn(err, f"metrics not written: internal error ({type(exc).__name__})")
    return True


def _warn(err, line: str) -> None:
    try:
        print(f"defender-setup: warning: {line}", file=err or sys.stderr)
    except (OSError, ValueError, AttributeError):
        pass
