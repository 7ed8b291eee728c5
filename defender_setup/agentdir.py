"""The agent directory: the only code that writes credential files.

Interface::

    d = AgentDir(root=Path("/"))
    d.write({"connection_string.txt": (b"...", 0o600)})   # whole set, atomically
    d.rollback()          # the previous set becomes current (and the current one previous)
    d.current()           # {name: bytes} of the credential files present
    d.method()            # "connection-string" | "certificate" | None
    d.repair()            # finish a write that was interrupted (every command calls it)

Why it is built this way:

* Each file is private from its first byte: created ``O_EXCL|O_NOFOLLOW`` with its final mode in
  a private staging directory, ``fsync``-ed, then renamed into place (cloud-init's
  atomic_helper, plus directory fsyncs so a power cut cannot undo a rename).
* The agent reads several files, so the *set* must change as a whole. A small journal makes
  that so: the new set is staged, the old set is hard-linked into ``previous.new``, then the
  journal ``txn`` is written atomically (the commit point), then files are renamed into place,
  the other method's files removed and the journal deleted. A crash before the commit point
  leaves the old set untouched (leftovers are discarded); a crash after it is rolled forward
  by :meth:`repair`. Between the first rename and the end of a roll-forward the set may be
  mixed; the journal's presence is what tells the next command to repair it.
* The previous set is kept as hard links in ``previous/`` for :meth:`rollback`.
* Symlinks, non-regular files and anything writable by others are refused (exit 77): the
  directory is root's, and following a planted link would write a secret elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from . import AGENT_DIR
from .credentials import ALL_FILES, method_of
from .errors import InputError, SetupError, UnsafeTargetError, WriteError

STATE = ".defender-setup"     # our private state inside the agent directory
STAGING = "staging"
PREVIOUS = "previous"
PREVIOUS_NEW = "previous.new"
JOURNAL = "txn"
DIR_MODE = 0o700


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` before any byte lands, write and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen it after writing
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _check_file(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeTargetError(f"{path} is a symbolic link; refusing to write credentials "
                                "through it. Remove the link (rm) and run the command again")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeTargetError(f"{path} is not a regular file; remove it and run the "
                                "command again")
    if st.st_mode & 0o002:
        raise UnsafeTargetError(f"{path} is writable by others; remove it or chmod o-w it and "
                                "run the command again")


class AgentDir:
    """The credential files of the micro agent under ``root``."""

    def __init__(self, root: Path | str = "/"):
        self.root = Path(root)
        self.path = self.root / AGENT_DIR
        self.state = self.path / STATE

    # -- checks -----------------------------------------------------------------------------
    def _check_dir(self, path: Path) -> bool:
        """Refuse an unsafe directory; return whether it exists."""
        st = _lstat(path)
        if st is None:
            return False
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafeTargetError(f"{path} is not a real directory (a symbolic link or a "
                                    "file); remove it and run the command again")
        if st.st_mode & 0o022:
            raise UnsafeTargetError(f"{path} is writable by group or others; run "
                                    f"'chmod 0700 {path}' after checking its contents")
        if st.st_uid != os.geteuid():
            raise UnsafeTargetError(f"{path} belongs to uid {st.st_uid}, not to uid "
                                    f"{os.geteuid()}; run 'chown root:root {path}'")
        return True

    def check(self) -> None:
        """Raise UnsafeTargetError if the directory or a credential file is unsafe."""
        if self._check_dir(self.path):
            for name in ALL_FILES:
                _check_file(self.path / name)
            self._check_dir(self.state)

    def _ensure_dirs(self) -> None:
        self.check()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for directory in (self.path, self.state):
                if not directory.exists():
                    directory.mkdir(mode=DIR_MODE)
                    _fsync_dir(directory.parent)
                # fchmod through an O_NOFOLLOW descriptor: chmod(follow_symlinks=False) is
                # not implemented on Debian 11's Python.
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchmod(fd, DIR_MODE)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise WriteError(f"cannot create {self.path}: {exc.strerror}") from None

    # -- reading ----------------------------------------------------------------------------
    def _files_in(self, directory: Path) -> dict[str, bytes]:
        found = {}
        for name in ALL_FILES:
            path = directory / name
            _check_file(path)
            if path.exists():
                try:
                    found[name] = _read(path)
                except OSError as exc:
                    raise InputError(f"cannot read {path}: {exc.strerror}") from None
        return found

    def current(self) -> dict[str, bytes]:
        """The credential files present now, by name (an absent directory gives ``{}``)."""
        if not self._check_dir(self.path):
            return {}
        return self._files_in(self.path)

    def method(self) -> str | None:
        return method_of(name for name in ALL_FILES if (self.path / name).exists())

    def modes(self) -> dict[str, int]:
        """Permission bits of the directory and each present file (for ``status``)."""
        result = {}
        for path in [self.path] + [self.path / name for name in ALL_FILES]:
            st = _lstat(path)
            if st is not None:
                result[str(path)] = stat.S_IMODE(st.st_mode)
        return result

    def has_previous(self) -> bool:
        """True when a non-empty previous generation exists to roll back to."""
        previous = self.state / PREVIOUS
        return previous.is_dir() and any((previous / name).exists() for name in ALL_FILES)

    def pending(self) -> bool:
        """True while an interrupted write waits for :meth:`repair`."""
        return (self.state / JOURNAL).exists()

    # -- writing ----------------------------------------------------------------------------
    def write(self, files: dict[str, tuple[bytes, int]]) -> None:
        """Replace the whole credential set with ``files``; keep the old set as previous."""
        unknown = set(files) - set(ALL_FILES)
        if unknown or not files:
            raise SetupError(f"refusing to write an unexpected file set: {sorted(unknown)}")
        self.repair()
        self._ensure_dirs()
        staging, previous_new = self.state / STAGING, self.state / PREVIOUS_NEW
        try:
            for leftover in (staging, previous_new):
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir(mode=DIR_MODE)
            for name, (data, mode) in files.items():
                _create(staging / name, data, mode)
            _fsync_dir(staging)
            previous_new.mkdir(mode=DIR_MODE)
            for name in ALL_FILES:
                if (self.path / name).exists():
                    os.link(self.path / name, previous_new / name, follow_symlinks=False)
            _fsync_dir(previous_new)
            _fsync_dir(self.state)
            journal = {"files": sorted(files)}
            tmp = self.state / (JOURNAL + ".tmp")
            if tmp.exists():
                tmp.unlink()
            _create(tmp, json.dumps(journal).encode(), 0o600)
            os.replace(tmp, self.state / JOURNAL)   # the commit point
            _fsync_dir(self.state)
        except OSError as exc:
            raise WriteError(f"cannot stage credentials in {self.state}: {exc.strerror}; "
                             "nothing was changed") from None
        self.repair()

    def repair(self) -> bool:
        """Finish an interrupted write (roll forward) or discard one that never committed.

        :returns: True if something was repaired.
        """
        if not self._check_dir(self.path) or not self._check_dir(self.state):
            return False
        journal_path = self.state / JOURNAL
        staging, previous_new = self.state / STAGING, self.state / PREVIOUS_NEW
        try:
            if not journal_path.exists():
                dirty = staging.exists() or previous_new.exists()
                for leftover in (staging, previous_new, self.state / (JOURNAL + ".tmp")):
                    if leftover.is_dir():
                        shutil.rmtree(leftover)
                    elif leftover.exists():
                        leftover.unlink()
                return dirty
            wanted = json.loads(_read(journal_path))["files"]
            if previous_new.exists():
                shutil.rmtree(self.state / PREVIOUS, ignore_errors=True)
                os.replace(previous_new, self.state / PREVIOUS)
            for name in wanted:
                if (staging / name).exists():
                    _check_file(self.path / name)
                    os.replace(staging / name, self.path / name)
            for name in set(ALL_FILES) - set(wanted):
                if (self.path / name).exists():
                    (self.path / name).unlink()
            _fsync_dir(self.path)
            journal_path.unlink()
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(self.state)
            return True
        except (OSError, ValueError, KeyError) as exc:
            raise WriteError(f"cannot complete the interrupted credential update in "
                             f"{self.path}: {exc}") from None

    def rollback(self) -> dict[str, bytes]:
        """Make the previous set current again (the current set becomes previous).

        :returns: the restored files.
        :raises InputError: when there is no previous generation.
        """
        self.repair()
        previous = self.state / PREVIOUS
        if not self._check_dir(self.path) or not self._check_dir(previous):
            raise InputError("there is no previous set of credentials to roll back to")
        files = self._files_in(previous)
        if not files:
            raise InputError("the previous generation is empty (the agent was unconfigured "
                             "before); nothing to roll back to")
        modes = {name: stat.S_IMODE(os.lstat(previous / name).st_mode) for name in files}
        self.write({name: (data, modes[name]) for name, data in files.items()})
        return files

    def unconfigure(self) -> None:
        """Remove every credential file (keeping the previous generation)."""
        self.check()
        for name in ALL_FILES:
            path = self.path / name
            if path.exists():
                path.unlink()
        if self.path.exists():
            _fsync_dir(self.path)
