"""File primitives of the agent directory: private from the first byte, never through a link.

Interface::

    create(path, data, mode)   # O_EXCL|O_NOFOLLOW with its final mode, written, fsync-ed
    replace(path, data, mode)  # create()d as PATH.tmp, renamed over PATH
        # both take dir_fd=: path is then a name in that open directory (the drop folder)
    read(path) -> bytes        # O_NOFOLLOW|O_NONBLOCK (a planted FIFO cannot hang a reader)
    lstat(path) -> stat | None
    fsync_dir(path); chmod_dir(path, mode)      # the latter through an O_NOFOLLOW descriptor
    check_file(path)           # UnsafeTargetError (77): a link, not regular, writable by others
    check_restorable(path)     # ... and for roll-back: linked elsewhere, not ours
    not_ours(stat) -> str | None   # the reason behind both, for the lock file too
    memory_file(name, data) -> (fd, Path)   # anonymous memory (memfd), never on a disk

Used by :mod:`defender_setup.agentdir`, the only writer; :func:`memory_file` by the probe and
the agent, which hand a private key to OpenSSL (which takes a path) without writing it out.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UnsafeTargetError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: Path, data: bytes, mode: int, dir_fd: int | None = None) -> None:
    """Create ``path`` with ``mode`` before any byte lands, write and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen it after writing
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: Path, data: bytes, mode: int, dir_fd: int | None = None) -> None:
    """Put ``data`` at ``path`` atomically: a fresh ``PATH.tmp`` (:func:`create`; a stale one,
    or a link planted at that name, is unlinked first), renamed over ``path`` (which replaces
    a link there, never writes through it), then the directory fsync-ed: by the caller when
    it gave ``dir_fd`` (some FAT drivers refuse that fsync, which it may forgive)."""
    tmp = path.with_name(path.name + ".tmp")
    if lstat(tmp, dir_fd) is not None:
        os.unlink(tmp, dir_fd=dir_fd)
    create(tmp, data, mode, dir_fd)
    os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if dir_fd is None:
        fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def memory_file(name: str, data: bytes) -> tuple[int, Path]:
    """``data`` in an anonymous memory file: its descriptor (the caller closes it) and the
    ``/proc/self/fd`` path this process can open it by. Only this process sees it."""
    fd = os.memfd_create(f"defender-setup-{name}", os.MFD_CLOEXEC)
    try:
        _write_all(fd, data)
    except OSError:
        os.close(fd)
        raise
    return fd, Path(f"/proc/self/fd/{fd}")


def chmod_dir(path: Path, mode: int) -> None:
    # fchmod through an O_NOFOLLOW descriptor: chmod(follow_symlinks=False) is not
    # implemented on Debian 11's Python.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def lstat(path: Path, dir_fd: int | None = None) -> os.stat_result | None:
    try:
        return os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def check_file(path: Path) -> None:
    st = lstat(path)
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


def not_ours(st: os.stat_result) -> str | None:
    """Why a file we only ever create ourselves is not such a file: not regular, linked
    elsewhere too (a hard link planted to an outside file), or someone else's. None if ours."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink != 1:
        return f"is hard-linked elsewhere ({st.st_nlink} links)"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not {os.geteuid()}"
    return None


def check_restorable(path: Path) -> None:
    """A file of ``previous/`` must be one we wrote: regular, ours, linked nowhere else."""
    problem = not_ours(os.lstat(path))
    if problem is not None:
        raise UnsafeTargetError(f"{path} {problem}; refusing to restore it. Remove the "
                                "previous set or apply the credentials again")
