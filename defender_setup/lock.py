"""The lock between the commands that touch the credential set: ``flock``, bounded, re-entrant.

Interface::

    with exclusive(path, timeout=30):   # writers: creates the lock file (0600, O_NOFOLLOW)
        ...                             # re-entrant within a process: nested calls are free
    with shared(path, timeout=5):       # readers: only if the file exists; opened read-only
        ...

Both raise :class:`~defender_setup.errors.BusyError` (exit 75) when the lock is still held
after ``timeout`` seconds, naming who holds it; a lock file that is a link, not a regular
file, hard-linked elsewhere or not ours raises ``UnsafeTargetError`` (77).

Why it is built this way:

* ``flock`` locks belong to an open file and vanish with the process, so a writer killed with
  SIGKILL never leaves a stale lock; the pid written into the file after locking is only a
  hint for the message (``/proc/locks`` is asked first: it names the real holder, a reader
  included).
* Waiting polls ``LOCK_NB`` every 20 ms up to a deadline: no signals, no threads, and the
  bound is exact. ``timeout=0`` is a single try.
* Writers are not starved by readers: ``flock`` has no writer preference, so a stream of
  overlapping readers (monitoring running status or check) could keep a writer out for
  ever. A gate in front of the lock fixes that: the directory that holds the lock file is
  flocked too, exclusively by a writer while it waits for the readers inside to leave,
  shared by a reader only on its way in. Once a writer is at the gate, new readers wait behind it.
* Re-entrant per process and path: a writer takes the lock once around its whole command
  (write, restart, verify, roll-back) and the library calls inside it (``AgentDir.write``,
  ``rollback``) take it again for free. Readers inside a writer's lock read freely.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError, UnsafeTargetError
from .safefs import not_ours

POLL = 0.02
_held: dict[str, list] = {}   # absolute path -> [fd, depth, exclusive]


def _safe(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    problem = not_ours(st)
    if problem is None and st.st_mode & 0o022:
        problem = "is writable by group or others"
    if problem:
        raise UnsafeTargetError(f"lock file {path} {problem}; remove it and run the command "
                                "again")


def _open(path: Path, create: bool) -> int | None:
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO cannot hang us
    flags |= (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UnsafeTargetError(f"lock file {path} is a symbolic link; remove it and run "
                                    "the command again") from None
        raise
    try:
        _safe(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _proc_locks_pids(fd: int) -> list[int]:
    """Pids holding a lock on the file ``fd`` is open on, from /proc/locks (Linux)."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters have "->"
                if len(parts) >= 6 and parts[1] != "->" and parts[5] == wanted \
                        and parts[4].isdigit():
                    pids.append(int(parts[4]))
    except OSError:
        pass
    return [pid for pid in pids if pid != os.getpid()]


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return f"pid {pid} ({handle.read().strip()})"
    except OSError:
        return f"pid {pid}"


def _holder_of(fd: int) -> str:
    pids = _proc_locks_pids(fd)
    if not pids:  # no /proc: the last writer's pid, written into the file
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        pids = [int(text)] if text.isdigit() else []
    return ", ".join(_describe(pid) for pid in sorted(set(pids)))


def _busy(fd: int, path: Path, timeout: float) -> BusyError:
    who = _holder_of(fd)
    return BusyError(f"another command is changing the credentials ({path} is held"
                     f"{' by ' + who if who else ''}); this command waited {timeout:g} s. Wait "
                     "for it to finish and run the command again (--lock-timeout S waits longer)")


def _acquire(fd: int, operation: int, deadline: float) -> bool:
    """Poll for the lock until ``deadline``; False when it did not come."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(POLL, remaining))


def _through_gate(fd: int, path: Path, operation: int, timeout: float) -> None:
    """Take ``operation`` on ``fd`` after passing the gate (see the module docstring)."""
    deadline = time.monotonic() + max(0.0, timeout)
    gate = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        gate_op = fcntl.LOCK_EX if operation == fcntl.LOCK_EX else fcntl.LOCK_SH
        if not (_acquire(gate, gate_op, deadline) and _acquire(fd, operation, deadline)):
            raise _busy(fd, path, timeout)  # names the lock's holder, not the gate's
    finally:
        os.close(gate)  # the gate is only for the way in


def holds(path: Path | str) -> bool:
    """True while this process holds the lock at ``path`` (a nested ``with`` is free)."""
    return os.path.abspath(path) in _held


def exclusive(path: Path | str, timeout: float = 30.0):
    """Hold the lock at ``path`` exclusively (creating the file); re-entrant per process."""
    return _locked(Path(path), timeout, exclusive=True)


def shared(path: Path | str, timeout: float = 5.0):
    """Hold the lock at ``path`` shared, if the file exists; never creates or writes it."""
    return _locked(Path(path), timeout, exclusive=False)


@contextmanager
def _locked(path: Path, timeout: float, exclusive: bool):
    key = os.path.abspath(path)
    entry = _held.get(key)
    if entry is not None:  # inside our own lock: free (a reader inside a writer reads freely)
        if exclusive and not entry[2]:
            raise RuntimeError(f"{path}: cannot upgrade a shared lock to an exclusive one")
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
        return
    fd = _open(path, create=exclusive)
    if fd is None:  # a reader and no lock file: no writer has ever run, nothing to wait for
        yield
        return
    try:
        _through_gate(fd, path, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout)
        if exclusive:  # the holder's pid, for the message of whoever waits in vain
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _held[key] = [fd, 1, exclusive]
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # closing releases the flock
