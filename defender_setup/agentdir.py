"""The agent directory: the only code that writes credential files.

Interface::

    d = AgentDir(root=Path("/"))   # the directory of the agent target.detect(root) finds
    with d.lock(timeout=30):   # writers: one exclusive lock around the whole command (exit 75)
        d.write({"connection_string.txt": (b"...", 0o600)}, origin="apply")  # whole set
        d.write(files, origin, previous={...})  # ... keeping this as the previous generation
        d.rollback()      # the previous set becomes current (and the current one previous)
        d.repair()        # finish a write that was interrupted
    # readers: provision.read, under the shared lock (never writes), one Stored snapshot
    d.unconfigure()       # no credentials; the removed set becomes the previous one
    d.current()           # {name: bytes} of the credential files present
    d.previous_files()    # {name: bytes} of the previous generation (for rollback)
    d.method()            # "connection-string" | "certificate" | None
    d.origin()            # {"source": "apply", "time": "...Z"} of the current set, or None
    d.pending()           # an interrupted write is waiting for repair()
    d.save_record(name, {...}) / d.record(name) / d.drop_record(name)
                          # small JSON facts in the private state (the last import's outcome)
    d.count(name)         # += 1 in the counters record (roll-backs, for the metrics)

Every committed change (write, rollback, unconfigure, a rolled-forward repair) also updates
the public, non-secret copy of its origin for the agent (:func:`defender_setup.facts.changed`).

Why it is built this way:

* Each file is private from its first byte: created ``O_EXCL|O_NOFOLLOW`` with its final mode in
  a private staging directory, ``fsync``-ed, then renamed into place (cloud-init's
  atomic_helper, plus directory fsyncs so a power cut cannot undo a rename).
* The agent reads several files, so the *set* must change as a whole. A small journal makes
  that so: the new set (and its origin record) is staged, the old set is hard-linked into
  ``previous.new``, then the journal ``txn`` is written atomically (the commit point), then
  files are renamed into place, the other method's files removed and the journal deleted. A
  crash before the commit point leaves the old set untouched (leftovers are discarded); a crash
  after it is rolled forward by :meth:`repair`. Between the first rename and the end of a
  roll-forward the set may be mixed; the journal's presence says so.
* Writers are serialised by an ``flock`` on ``.defender-setup/lock`` (:mod:`.lock`), held by
  the command line for the whole command, restart and verification included, so nobody
  changes the set under a verification. Every command that changes or verifies the set
  holds it, so its release is where the textfile metrics are refreshed (:mod:`.metrics`,
  only where node_exporter's directory exists), once per command. Readers (``status``,
  ``check``) take it shared, only if it exists, and never repair, create or delete anything.
* The previous set is kept as hard links in ``previous/`` for :meth:`rollback`, which
  validates it and restores the documented modes; a file there that is linked elsewhere, not
  regular or not ours is refused (77).
* Symlinks, non-regular files and anything writable by others are refused (exit 77), in the
  private state too: the directory is root's, and following a planted link would write a
  secret elsewhere. Under a ``root`` other than ``/`` a symlinked ``var`` is refused as well.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from . import facts, lock
from .credentials import ALL_FILES, SEALED_NAMES, load, method_of
from .errors import InputError, SetupError, UnsafeTargetError, ValidationError, WriteError
from .safefs import (
    check_file,
    check_restorable,
    chmod_dir,
    create,
    fsync_dir,
    lstat,
    read,
    replace,
)
from .target import Target, detect

STATE = ".defender-setup"     # our private state inside the agent directory
STAGING = "staging"
PREVIOUS = "previous"
PREVIOUS_NEW = "previous.new"
JOURNAL = "txn"
LOCK = "lock"
ORIGIN = "origin.json"        # where the current set came from (never a secret)
IMPORT_RECORD = "import.json"  # the last boot-time import's outcome (importer.py writes it)
COUNTERS = "counters.json"    # {"rollbacks": n}: for the metrics' counters
DPS_RECORD = "dps.json"        # the last DPS registration (zerotouch.py writes it)
STATE_DIRS = (STAGING, PREVIOUS, PREVIOUS_NEW)
STATE_FILES = (JOURNAL, JOURNAL + ".tmp", LOCK, ORIGIN)
DIR_MODE = 0o700
PARENT_MODE = 0o755           # var/ and the like, when we have to create them
WRITE_WAIT = 30.0             # seconds a writer waits for another one
READ_WAIT = 5.0               # seconds a reader waits for a writer


def now() -> str:
    from datetime import datetime, timezone  # lazy: a cold status or check never needs it

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def when(text) -> float | None:
    """A record's time (:func:`now`'s format, or whole seconds as written before) as a POSIX
    timestamp; None when absent or malformed. Records are compared as times, not strings."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class AgentDir:
    """The credential files of the micro agent under ``root``."""

    def __init__(self, root: Path | str = "/", target: Target | None = None):
        self.root = Path(root)
        # Which agent, hence which directory: target.detect decides (its one place).
        self.target = target if target is not None else detect(self.root)
        self.path = self.root / self.target.agent_dir
        self.state = self.path / STATE

    # -- checks -----------------------------------------------------------------------------
    def _check_dir(self, path: Path, owned: bool = True) -> bool:
        """Refuse an unsafe directory; return whether it exists. ``owned``: ours alone
        (not writable by group or others, our uid), else only a real directory."""
        st = lstat(path)
        if st is None:
            return False
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafeTargetError(f"{path} is not a real directory (a symbolic link or a "
                                    "file); remove it and run the command again")
        if not owned:
            return True
        if st.st_mode & 0o022:
            raise UnsafeTargetError(f"{path} is writable by group or others; run "
                                    f"'chmod 0700 {path}' after checking its contents")
        if st.st_uid != os.geteuid():
            raise UnsafeTargetError(f"{path} belongs to uid {st.st_uid}, not to uid "
                                    f"{os.geteuid()}; run 'chown root:root {path}'")
        return True

    def _check_parents(self) -> None:
        # On the running system /var is the administrator's; in a tree given with --root a
        # symlinked var/ could lead out of the tree (into the host's /etc, say): refuse it.
        if self.root.resolve() == Path("/"):
            return
        parts = Path(self.target.agent_dir).parts  # root/var, ... up to the agent directory
        for parent in (self.root.joinpath(*parts[:i]) for i in range(1, len(parts))):
            st = lstat(parent)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise UnsafeTargetError(f"{parent} is not a real directory (a symbolic link "
                                        "or a file) inside --root; refusing to follow it")

    def _check_state(self) -> bool:
        """Refuse unsafe private state; return whether the state directory exists."""
        if not self._check_dir(self.state):
            return False
        for name in STATE_DIRS:
            self._check_dir(self.state / name, owned=False)
        for name in STATE_FILES:
            check_file(self.state / name)
        return True

    def check(self) -> None:
        """Raise UnsafeTargetError if the directory, a credential file or our state is unsafe."""
        self._check_parents()
        if self._check_dir(self.path):
            for name in ALL_FILES:
                check_file(self.path / name)
            self._check_state()

    def _ensure_dirs(self) -> None:
        self.check()
        try:
            missing = [p for p in reversed(self.path.parents) if lstat(p) is None]  # top down
            for parent in missing:  # explicit modes: an umask of 000 must not make them 0777
                parent.mkdir(mode=PARENT_MODE)
                chmod_dir(parent, PARENT_MODE)
            for directory in (self.path, self.state):
                if not directory.exists():
                    directory.mkdir(mode=DIR_MODE)
                    fsync_dir(directory.parent)
                chmod_dir(directory, DIR_MODE)
        except OSError as exc:
            raise WriteError(f"cannot create {self.path}: {exc.strerror}") from None

    # -- locking ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, timeout: float = WRITE_WAIT):
        """Context manager: the writers' exclusive lock (creates the private state). When
        the outermost hold ends, the metrics are refreshed, still under the lock (one
        consistent snapshot); nested holds are free and refresh nothing."""
        self._ensure_dirs()
        path = self.state / LOCK
        outermost = not lock.holds(path)
        with lock.exclusive(path, timeout):
            try:
                yield
            finally:
                if outermost:
                    from .metrics import refresh  # lazy: nothing to do without node_exporter

                    refresh(self.root)

    def read_lock(self, timeout: float = READ_WAIT):
        """Context manager: a shared lock if the lock file exists; never creates anything."""
        self.check()
        return lock.shared(self.state / LOCK, timeout)

    # -- reading ----------------------------------------------------------------------------
    def _files_in(self, directory: Path) -> dict[str, bytes]:
        found = {}
        for name in ALL_FILES:
            path = directory / name
            check_file(path)
            if lstat(path) is not None:
                try:
                    found[name] = read(path)
                except OSError as exc:
                    raise InputError(f"cannot read {path}: {exc.strerror}") from None
        return found

    def current(self) -> dict[str, bytes]:
        """The credential files present now, by name (an absent directory gives ``{}``)."""
        if not self._check_dir(self.path):
            return {}
        return self._files_in(self.path)

    def method(self) -> str | None:
        return method_of(self.current())

    def modes(self) -> dict[str, int]:
        """Permission bits of the directory and each present file (for ``status``)."""
        paths = [self.path, *(self.path / name for name in ALL_FILES)]
        return {str(p): stat.S_IMODE(st.st_mode) for p in paths if (st := lstat(p)) is not None}

    def has_previous(self) -> bool:
        """True when a non-empty previous generation exists to roll back to."""
        previous = self.state / PREVIOUS
        return previous.is_dir() and any((previous / name).exists() for name in ALL_FILES)

    def previous_files(self) -> dict[str, bytes]:
        """The previous generation's files by name (``{}`` when there is none)."""
        previous = self.state / PREVIOUS
        return self._files_in(previous) if self._check_dir(previous) else {}

    def pending(self) -> bool:
        """True while an interrupted write waits for :meth:`repair`."""
        return lstat(self.state / JOURNAL) is not None

    def origin(self) -> dict | None:
        """Where the current set came from (``{"source", "time", ...}``), None if unknown."""
        return self.record(ORIGIN)

    # -- writing ----------------------------------------------------------------------------
    def write(self, files: dict[str, tuple[bytes, int]],
              origin: str | dict | None = None, previous: dict | None = None) -> None:
        """Replace the whole credential set with ``files``; keep the old set as previous.

        :param origin: where the set comes from, recorded with it: a source name
            (``"apply"``, ``"debconf"``, ``"rollback"``, ...) or a dict of short strings with
            a ``source`` key; the time is added. Never put a secret here.
        :param previous: the previous generation to keep instead of the old set itself
            (``{name: (data, mode)}``: the old set sealed), in the same transaction.
        """
        unknown = (set(files) | set(previous or {})) - set(ALL_FILES)
        if unknown or not files:
            raise SetupError(f"refusing to write an unexpected file set: {sorted(unknown)}")
        record = {"source": origin} if isinstance(origin, str) else dict(origin or {})
        record.setdefault("source", "unknown")
        record.setdefault("time", now())
        with self.lock():
            self._repair()
            self._stage(files, record, previous)
            self._repair()

    def _stage(self, files: dict, record: dict, previous: dict | None = None) -> None:
        import shutil  # lazy: it pulls in bz2 and lzma, which status and check never need

        staging, previous_new = self.state / STAGING, self.state / PREVIOUS_NEW
        try:
            for leftover in (staging, previous_new):
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir(mode=DIR_MODE)
            for name, (data, mode) in files.items():
                create(staging / name, data, mode)
            create(staging / ORIGIN, json.dumps(record, sort_keys=True).encode(), 0o600)
            fsync_dir(staging)
            previous_new.mkdir(mode=DIR_MODE)
            for name, (data, mode) in (previous or {}).items():
                create(previous_new / name, data, mode)
            for name in ALL_FILES if previous is None else ():
                if (self.path / name).exists():
                    os.link(self.path / name, previous_new / name, follow_symlinks=False)
            fsync_dir(previous_new)
            fsync_dir(self.state)
            journal = {"files": sorted(files), "origin": ORIGIN}
            replace(self.state / JOURNAL, json.dumps(journal).encode(), 0o600)  # the commit
        except OSError as exc:
            raise WriteError(f"cannot stage credentials in {self.state}: {exc.strerror}; "
                             "nothing was changed") from None

    def repair(self) -> bool:
        """Finish an interrupted write (roll forward) or discard one that never committed.

        Takes the writers' lock. :returns: True if something was repaired.
        """
        self.check()
        if lstat(self.state) is None:  # (check() refused an unsafe one) nothing to repair
            return False
        with self.lock():
            return self._repair()

    def _repair(self) -> bool:
        import shutil  # lazy: it pulls in bz2 and lzma, which status and check never need

        if not self._check_dir(self.path) or not self._check_state():
            return False
        journal_path = self.state / JOURNAL
        staging, previous_new = self.state / STAGING, self.state / PREVIOUS_NEW
        try:
            if not self.pending():
                dirty = staging.exists() or previous_new.exists()
                for leftover in (staging, previous_new, self.state / (JOURNAL + ".tmp")):
                    if leftover.is_dir():
                        shutil.rmtree(leftover)
                    elif leftover.exists():
                        leftover.unlink()
                return dirty
            journal = json.loads(read(journal_path))
            wanted = journal["files"]
            if previous_new.exists():
                shutil.rmtree(self.state / PREVIOUS, ignore_errors=True)
                os.replace(previous_new, self.state / PREVIOUS)
            for name in wanted:
                if (staging / name).exists():
                    check_file(self.path / name)
                    os.replace(staging / name, self.path / name)
            for name in set(ALL_FILES) - set(wanted):
                if (self.path / name).exists():
                    (self.path / name).unlink()
            origin = journal.get("origin") == ORIGIN and (staging / ORIGIN).exists()
            if origin:
                os.replace(staging / ORIGIN, self.state / ORIGIN)
            fsync_dir(self.path)
            journal_path.unlink()
            shutil.rmtree(staging, ignore_errors=True)
            fsync_dir(self.state)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WriteError(f"cannot complete the interrupted credential update in "
                             f"{self.path}: {exc}") from None
        if origin:  # the public, non-secret copy (the agent cannot read ours)
            facts.changed(self.root, self.origin() or {})
        return True

    def rollback(self) -> dict[str, bytes]:
        """Make the previous set current again (the current set becomes previous).

        The previous set is validated like new input and written with the documented modes.

        :returns: the restored files.
        :raises InputError: when there is no previous generation (66).
        :raises ValidationError: when it does not pass validation (65); nothing is changed.
        :raises NotConfigured: it holds no connection string (78); nothing is changed.
        :raises UnsafeTargetError: for a file there that is linked elsewhere, not a regular
            file or not ours (77); nothing is changed.
        """
        with self.lock():
            self._repair()
            previous = self.state / PREVIOUS
            if not self._check_dir(self.path) or not self._check_dir(previous):
                raise InputError("there is no previous set of credentials to roll back to")
            files = self._files_in(previous)
            if not files:
                raise InputError("the previous generation is empty (the agent was "
                                 "unconfigured before); nothing to roll back to")
            for name in files:
                check_restorable(previous / name)
            from .sealing import decrypted  # sealed files are validated decrypted

            plain = decrypted(files, context=f" (in the previous set, {previous}); nothing "
                              "was restored")[0]
            try:
                validated = load(plain, previous)
            except ValidationError as exc:
                raise ValidationError(exc.field, f"{exc.message} (in the previous set, "
                                      f"{previous}); nothing was restored") from None
            restored = dict(validated.files)
            for name, sealed in SEALED_NAMES.items():  # a sealed file is restored sealed
                if sealed in files:
                    restored.pop(name, None)
                    restored[sealed] = (files[sealed], 0o600)
            self.write(restored, origin="rollback")
            self.count("rollbacks")
            return files

    def unconfigure(self) -> None:
        """Remove every credential file; they become the previous generation (nothing is
        lost: ``rollback`` brings them back), through the same journal as :meth:`write`."""
        with self.lock():
            self._repair()
            if not any((self.path / name).exists() for name in ALL_FILES):
                return
            self._stage({}, {"source": "unconfigured", "time": now()})
            self._repair()

    # -- records: small JSON facts beside the origin (never a secret) ---------------------
    def save_record(self, name: str, data: dict) -> None:
        """Write ``.defender-setup/NAME`` atomically (0600) under the writers' lock, e.g. the
        last boot-time import's outcome."""
        with self.lock():
            path = self.state / name
            check_file(path)
            try:
                replace(path, json.dumps(data, sort_keys=True).encode(), 0o600)
            except OSError as exc:
                raise WriteError(f"cannot write {path}: {exc.strerror}") from None

    def count(self, name: str) -> None:
        """Add one to counter ``name`` in the counters record (under the writers' lock)."""
        with self.lock():
            counters = self.record(COUNTERS) or {}
            value = counters.get(name)
            counters[name] = (value if isinstance(value, int) and value >= 0 else 0) + 1
            self.save_record(COUNTERS, counters)

    def record(self, name: str) -> dict | None:
        """A record written by :meth:`save_record`; None when absent or unreadable. Reads
        only (no lock, no repair): the record is replaced atomically."""
        try:
            data = json.loads(read(self.state / name))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def drop_record(self, name: str) -> None:
        with self.lock():
            try:
                (self.state / name).unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise WriteError(f"cannot remove {self.state / name}: {exc.strerror}") from None
            fsync_dir(self.state)
