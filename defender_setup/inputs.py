"""Reading the files a person names (credentials, certificates): one place, bounded, one set of
errors.

Interface::

    read_file(path, field, follow=True) -> bytes   # a regular file (or /dev/null), at most
                                                   # LIMITS[field]; follow=False: O_NOFOLLOW
    read_stream(stream, field) -> bytes   # standard input, at most LIMITS[field]

``field`` is :data:`~defender_setup.errors.CONNECTION_STRING`, ``CERTIFICATE`` or
``PRIVATE_KEY``. A path that is missing, unreadable or not a regular file (a FIFO, a device
such as /dev/zero, a directory) raises :class:`InputError` (exit 66) before anything is read,
and without blocking: a FIFO is never opened for a blocking read. Content over the limit raises
:class:`ValidationError` (exit 65) naming the limit; no more than limit + 1 bytes is ever read.
Messages name the path and the fix, never the content. :func:`check_size` applies the same
limits to content that came another way (a stored set, a systemd credential).
"""

from __future__ import annotations

import os
import stat

from .errors import (
    CERTIFICATE,
    CONNECTION_STRING,
    PRIVATE_KEY,
    Field,
    InputError,
    ValidationError,
)
from .errors import printable as _printable

# The longest valid connection string (253-character host and gateway names, 128-character
# ids, a 64-byte key) is about 920 bytes; the rest is room for what pasting adds.
CONNECTION_STRING_MAX = 1024
# systemd hands the unit its files (LoadCredential=, conf.json included) only while they fit its
# CREDENTIALS_TOTAL_SIZE_MAX, 1 MiB in systemd 247, 252 and 257; over it the agent never starts
# (243/CREDENTIALS, "Protocol error"). Measured in containers: 247 and 252 count each file's
# size plus its ID's length (247 also every SetCredential= stand-in), 257 whole 4 KiB pages of
# a 1 MiB tmpfs. With conf.json at its 64 KiB, the largest set still fits in all three.
CERTIFICATE_MAX = 768 * 1024  # a chain of a dozen 4096-bit certificates is under 30 KiB
PRIVATE_KEY_MAX = 64 * 1024  # an RSA 16384-bit key is under 13 KiB
DPS_KEY_MAX = 1024  # a 64-byte key is 88 base64 characters; the rest is room for pasting
DPS_TEXT_MAX = 1024  # an ID scope, a registration ID (128), an endpoint (253 + a port)
LIMITS = {CONNECTION_STRING: CONNECTION_STRING_MAX, CERTIFICATE: CERTIFICATE_MAX,
          PRIVATE_KEY: PRIVATE_KEY_MAX, Field.DPS_KEY: DPS_KEY_MAX,
          Field.DPS_ID_SCOPE: DPS_TEXT_MAX, Field.DPS_REGISTRATION_ID: DPS_TEXT_MAX,
          Field.DPS_ENDPOINT: DPS_TEXT_MAX}
_SYSTEMD = "systemd hands the agent at most 1 MiB of credentials in all; "
_FIXES = {CONNECTION_STRING: "is it the right file?",
          CERTIFICATE: _SYSTEMD + "the chain needs only the leaf and its issuers, each once",
          PRIVATE_KEY: _SYSTEMD + "give the file that holds only the private key",
          Field.DPS_KEY: "give the file that holds only the base64 key",
          Field.DPS_ID_SCOPE: "give the file that holds only the ID scope",
          Field.DPS_REGISTRATION_ID: "give the file that holds only the registration ID",
          Field.DPS_ENDPOINT: "give the file that holds only the host name"}

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def describe_limit(limit: int) -> str:
    if limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MiB"
    if limit % 1024 == 0 and limit >= 10 * 1024:  # a connection string stays "1024 bytes"
        return f"{limit // 1024} KiB"
    return f"{limit} bytes"


def _too_large(field: str, what: str) -> ValidationError:
    return ValidationError(field, f"{what}; a {field} file is at most "
                           f"{describe_limit(LIMITS[field])} ({_FIXES[field]})")


def check_size(data: bytes | str, field: str) -> None:
    """Refuse content over ``LIMITS[field]``, as :func:`read_file` would have (text counts
    as its UTF-8 bytes).

    :raises ValidationError: larger than the limit.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > LIMITS[field]:
        raise _too_large(field, f"the file is {len(data)} bytes")


def _is_dev_null(st: os.stat_result) -> bool:
    # "--private-key /dev/null" is how people say "nothing": read it as the empty file it is.
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def _refuse_kind(st: os.stat_result, field: str, shown: str) -> None:
    if stat.S_ISREG(st.st_mode) or _is_dev_null(st):
        return
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise InputError(f"{shown} is {kind}, not a regular file; give the file that holds the "
                     f"{field}", field)


def read_file(path: str, field: str, follow: bool = True) -> bytes:
    """Read the regular file ``path`` (symbolic links followed unless ``follow`` is false:
    then a link is not a regular file), at most ``LIMITS[field]``.

    :raises InputError: missing, unreadable, or not a regular file (checked before reading).
    :raises ValidationError: larger than the limit.
    """
    limit = LIMITS[field]
    shown = _printable(path)
    try:
        # a FIFO must not even be opened
        _refuse_kind(os.stat(path, follow_symlinks=follow), field, shown)
        # O_NONBLOCK: should a FIFO replace the file after stat(), open() still returns at
        # once, and fstat() below refuses it; for a regular file the flag changes nothing.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(path, flags if follow else flags | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise InputError(f"{shown} does not exist; check the path", field) from None
    except OSError as exc:
        raise InputError(f"cannot read {shown}: {exc.strerror}", field) from None
    try:
        with open(fd, "rb") as handle:  # closes fd
            st = os.fstat(fd)
            _refuse_kind(st, field, shown)
            if st.st_size > limit:
                raise _too_large(field, f"{shown} is {st.st_size} bytes")
            # The file may grow after fstat(): read (as often as it takes) one byte past the limit.
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {shown}: {exc.strerror}", field) from None
    if len(data) > limit:
        raise _too_large(field, f"{shown} is over {limit} bytes")
    return data


def read_stream(stream, field: str) -> bytes:
    """Read a binary stream (standard input) to its end, at most ``LIMITS[field]`` bytes.

    :raises InputError: the stream is closed or unreadable.
    :raises ValidationError: it holds more than the limit.
    """
    limit = LIMITS[field]
    if stream is None:
        raise InputError("standard input is closed; give a file instead of -", field)
    try:
        data = stream.read(limit + 1)
    except (OSError, ValueError) as exc:  # ValueError: read from a closed file
        reason = getattr(exc, "strerror", None) or "it is closed"
        raise InputError(f"cannot read standard input: {reason}", field) from None
    if len(data) > limit:
        raise _too_large(field, f"standard input holds over {limit} bytes")
    return data
