"""The debconf adapter's hub probe: at most one connection per dpkg run.

Interface::

    at_config(plan, root)              # the config script: probe, note the outcome
    at_postinst(plan, root) -> line    # the postinst: the noted outcome (used once) or a probe

Both raise the hub's refusal (ProbeRefused: a ValidationError whose field routes the re-ask
to the connection string or the certificate question).

The config script runs just before the postinst in every dpkg run that configures: its
outcome is noted under a digest of the set and used once by the postinst, instead of a second
CONNECT as the same identity. The note is on the tmpfs /run (gone at the next boot), outside
the agent directory, which a refused answer must leave untouched.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from .agentdir import now, when
from .errors import Field
from .probe import ProbeRefused, probe
from .provision import digest
from .safefs import lstat, not_ours, read, replace

NOTE = "run/defender-setup/probe.json"
REUSE = 600  # seconds: older, it is from another dpkg run (one that never configured)
NOTE_MAX = 4096  # bytes; the note is a digest, a time and one line


def at_config(p, root: Path) -> None:
    seen = _noted(p, root)
    if seen is not None:  # the config script asked again: the same answer, the same outcome
        _outcome(seen)
        return
    outcome = probe(p.validated, root)
    error = outcome.error
    _write(Path(root) / NOTE, {"digest": digest(p.validated.files), "line": outcome.line,
                               "time": now(), "field": error.field.name if error else None,
                               "message": error.message if error else None})
    if error is not None:
        raise error  # reported once, as the answer's error


def at_postinst(p, root: Path) -> str:
    seen = _noted(p, root)
    if seen is not None:
        (Path(root) / NOTE).unlink(missing_ok=True)  # used once
        return _outcome(seen)
    outcome = probe(p.validated, root)
    if outcome.error is not None:
        raise outcome.error
    return outcome.line


def _noted(p, root: Path) -> dict | None:
    """The note, when it is ours, about the plan's set and recent."""
    note = Path(root) / NOTE
    st = lstat(note)
    if st is None or not_ours(st) or st.st_size > NOTE_MAX:  # bounded before it is read
        return None
    try:
        seen = json.loads(read(note))
    except (OSError, ValueError):
        return None
    if isinstance(seen, dict) and seen.get("digest") == digest(p.validated.files) \
            and 0 <= time.time() - (when(seen.get("time")) or 0) < REUSE:
        return seen
    return None


def _outcome(seen: dict) -> str:
    """A noted outcome: the refusal raised again, else the probe's line."""
    if seen.get("field"):
        raise ProbeRefused(Field[seen["field"]], seen.get("message", "refused"))
    return seen.get("line", "")


def _write(note: Path, data: dict) -> None:
    """Best effort (root-only, O_EXCL, renamed into place): without it apply probes again."""
    if not note.parent.parent.is_dir():  # no /run under root (an image build)
        return
    try:
        note.parent.mkdir(mode=0o700, exist_ok=True)
        st = lstat(note.parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return
        replace(note, json.dumps(data).encode(), 0o600)
    except OSError:
        pass
