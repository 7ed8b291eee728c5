"""Reading the files a person names (credentials, certificates): one place, one set of errors.

Interface::

    read_file(path, what) -> bytes    # raises InputError (exit 66) naming ``what`` and the path

Messages name the path and the fix, never the content.
"""

from __future__ import annotations

from .errors import InputError


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise InputError(f"{what}: {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{what}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"{what}: cannot read {path}: {exc.strerror}") from None
