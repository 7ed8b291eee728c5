"""What systemd hands the agent in ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``).

Interface::

    directory(environ=None) -> Path | None      # None: not started by systemd with credentials
    read(directory, name, limit=MAX_BYTES) -> bytes | None   # None: not handed over

The agent runs as an unprivileged dynamic user and cannot open ``/var/defender_iot_micro_agent``;
PID 1 reads the root-only files and gives the service private, read-only copies (decrypted,
for ``LoadCredentialEncrypted=``). A file that does not exist (the other method's files, a
plain file when the set is sealed, no conf.json) would make ``LoadCredential=`` fail the start,
so the unit sets :data:`ABSENT` for each ID with ``SetCredential=``, which systemd uses only
when loading fails: :func:`read` turns it back into "not there".
"""

from __future__ import annotations

import os
from pathlib import Path

ABSENT = b"absent"  # the unit's SetCredential= stand-in (debian/*.service)
MAX_BYTES = 1024 * 1024  # bounds what is read; a credential set is a few kilobytes


def directory(environ: dict | None = None) -> Path | None:
    value = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def read(directory: Path, name: str, limit: int = MAX_BYTES) -> bytes | None:
    """The credential ``name``; None when systemd did not load it (absent, or not listed).

    :raises OSError: it exists but cannot be read; ValueError: larger than ``limit``.
    """
    try:
        with open(Path(directory) / name, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        return None
    if len(data) > limit:
        raise ValueError(f"credential {name} is larger than {limit} bytes")
    return None if data == ABSENT else data
