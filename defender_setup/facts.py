"""What the device may tell the world about its credential set: where the current set came
from, the last change and the last verification, in one small public file that is never a
secret.

Interface::

    changed(root, origin_record)          # a set was stored: AgentDir, after its commit point
    pending_change(root) -> dict | None   # the change still waiting for its verdict
    settled(root, outcome, change)        # the verdict of verify.settle (and the change judged)
    read(root) -> Facts                   # bounded, validated; what the agent reports
    FACTS                                 # var/lib/defender-setup/facts.json, under root

Why a file of its own: the agent runs as an unprivileged dynamic user that cannot even see
the agent directory (where ``origin.json`` lives), and it must learn of a verdict reached
*after* it started (``defender-setup restart`` judges the running agent). So the writers
(root) copy the non-secret facts into ``/var/lib/defender-setup/facts.json`` (0644, its
directory 0755), which the agent's read-only view of the system includes, and the agent
looks at it again when it changes.

Never a secret, by construction: only enumerated words (:data:`ORIGINS`, :data:`RESULTS`) and
times in one fixed format are written, and :func:`read` drops anything else, so neither a
bug on the writing side nor an edited file can make the agent publish free text.

Writing the facts is best effort: they describe the set, they are not the set. A failure to
write them never fails a credential change or a verification (the next one writes them
again); the agent then reports what it knew.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

FACTS = "var/lib/defender-setup/facts.json"
MAX_BYTES = 16 * 1024  # a facts file is about 300 bytes; anything larger is not ours
ORIGINS = ("debconf", "apply", "credential", "drop-folder", "dps", "rollback", "unconfigured")
# lastChange.result: "written" until a verification judged it; lastVerification.result
RESULTS = ("written", "verified", "rolled-back", "unconfigured", "failed")
# verify.settle's outcomes -> the words reported (a skipped verification judges nothing)
OUTCOMES = {"healthy": "verified", "rolled back": "rolled-back",
            "unconfigured": "unconfigured", "failed": "failed"}
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


@dataclass(frozen=True)
class Facts:
    """The validated content of the facts file; None where unknown."""

    origin: str | None = None              # of the current set
    last_change: dict | None = None        # {"time", "origin", "result"}
    last_verification: dict | None = None  # {"time", "result"}


def _now() -> str:
    from .agentdir import now

    return now()


def _word(value, allowed) -> str | None:
    return value if isinstance(value, str) and value in allowed else None


def _time(value) -> str | None:
    return value if isinstance(value, str) and _TIME.fullmatch(value) else None


def _record(value, origin: bool) -> dict | None:
    """A lastChange (``origin``: it has one) or lastVerification record, or None."""
    if not isinstance(value, dict):
        return None
    item = {"time": _time(value.get("time"))}
    if origin:
        item["origin"] = _word(value.get("origin"), ORIGINS)
    item["result"] = _word(value.get("result"), RESULTS)
    return item if item["time"] and item["result"] else None


def parse(data: bytes) -> Facts:
    """The facts in ``data``, every field checked (pure); an unreadable file is no facts."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return Facts()
    if not isinstance(raw, dict):
        return Facts()
    return Facts(_word(raw.get("origin"), ORIGINS), _record(raw.get("lastChange"), True),
                 _record(raw.get("lastVerification"), False))


def read(root: Path = Path("/")) -> Facts:
    """The facts under ``root``; empty when the file is missing, not a regular file, too
    large or malformed. Reads at most :data:`MAX_BYTES` (the agent calls this)."""
    try:
        fd = os.open(Path(root) / FACTS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK)
        with open(fd, "rb") as handle:  # closes fd
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return Facts()
            data = handle.read(MAX_BYTES + 1)
    except OSError:
        return Facts()
    return Facts() if len(data) > MAX_BYTES else parse(data)


def _dump(facts: Facts) -> bytes:
    return json.dumps({"origin": facts.origin, "lastChange": facts.last_change,
                       "lastVerification": facts.last_verification},
                      sort_keys=True).encode() + b"\n"


def _write(root: Path, facts: Facts) -> None:
    """Atomically, readable by all (the agent is another user), never through a link."""
    from .safefs import lstat, replace

    path = Path(root) / FACTS
    try:
        for directory in (path.parent.parent, path.parent):  # var/lib, var/lib/defender-setup
            st = lstat(directory)
            if st is None:
                directory.mkdir(mode=0o755, parents=True, exist_ok=True)
                directory.chmod(0o755)  # a umask of 077 (a unit's UMask=) would hide it
            elif not stat.S_ISDIR(st.st_mode):
                return  # a link or a file planted there: write nothing through it
        replace(path, _dump(facts), 0o644)
    except OSError:
        pass  # best effort: see the module docstring


def changed(root: Path, origin: dict) -> None:
    """A set was stored with the origin record ``origin`` (``{"source", "time", ...}``): it
    is the current set's origin and the last change, not yet judged."""
    old = read(root)
    source = _word(origin.get("source"), ORIGINS)
    when = _time(origin.get("time")) or _now()
    _write(root, Facts(source, {"time": when, "origin": source, "result": "written"},
                       old.last_verification))


def pending_change(root: Path) -> dict | None:
    """The last change while no verification has judged it yet (verify.settle takes it
    before a roll-back records a change of its own)."""
    change = read(root).last_change
    return change if change and change["result"] == "written" else None


def settled(root: Path, outcome: str, change: dict | None) -> None:
    """Record ``outcome`` (verify.settle's) as the last verification, and as the result of
    ``change`` (from :func:`pending_change`) when it judged one. A roll-back made by the
    verification stays the current set's origin; the last change stays the one judged."""
    result = OUTCOMES.get(outcome)
    if result is None:  # skipped: nothing was judged
        return
    old = read(root)
    last = dict(change, result=result) if change else old.last_change
    _write(root, Facts(old.origin, last, {"time": _now(), "result": result}))
