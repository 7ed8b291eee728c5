"""Domain exceptions, the fields they are about, and every exit code of the package.

Every error carries a message a person can act on and never the secret itself: callers build
messages from field names, positions and lengths, not from values. Text that comes from a file
(a certificate's subject, a path) goes through :func:`printable` before it is shown.

``field`` says which input an error is about, so that callers route it by structure, never by
its wording (the debconf bridge maps fields to questions with a table). Connection-string
errors name the key instead (``HostName``, ``SharedAccessKey``...; see
:mod:`defender_setup.connection_string`).
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 2
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70  # a bug: one line with its location, no traceback
EX_CANTCREAT = 73
EX_IOERR = 74  # standard output closed: the report was lost
EX_TEMPFAIL = 75  # busy: another command holds the lock on the credential set
EX_REJECTED = 76  # agent: the hub refused the identity (the unit's RestartPreventExitStatus)
EX_NOPERM = 77
EX_CONFIG = 78
EX_INTERRUPTED = 130  # SIGINT / Ctrl-C, as shells report it (128 + 2)

# The inputs a person gives; each is the prefix of its errors ("certificate: ...").
AUTH_METHOD = "authentication method"
CONNECTION_STRING = "connection string"
CERTIFICATE = "certificate"
PRIVATE_KEY = "private key"
HUB_HOSTNAME = "IoT Hub host name"  # the certificate method's identity questions
DEVICE_ID = "device id"
MODULE_ID = "module id"


def printable(text: str) -> str:
    """``text`` with control and other invisible characters escaped (``\\x1b``, ``\\n``...).

    For text read from files that ends up on a terminal or in a one-line message: a
    certificate's subject can hold escape sequences or line breaks.
    """
    if text.isprintable():
        return text
    # repr() of a lone unprintable character is its escape between quotes: '\x1b' -> \x1b
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SetupError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with, ``field`` what it is about."""

    exit_code = EX_CONFIG

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class NotConfigured(SetupError):
    """No credential set is stored (no connection string): the device is not configured."""

    exit_code = EX_CONFIG


class ValidationError(SetupError):
    """Invalid credentials: ``field`` names what is wrong (e.g. ``SharedAccessKey``)."""

    exit_code = EX_DATAERR

    def __init__(self, field: str, message: str):
        super().__init__(message, field)


class InputError(SetupError):
    """An input file is missing or unreadable, or not a regular file."""

    exit_code = EX_NOINPUT


class UnsafeTargetError(SetupError):
    """A target is a symlink, not a regular file, or writable by others."""

    exit_code = EX_NOPERM


class WriteError(SetupError):
    """A file could not be written."""

    exit_code = EX_CANTCREAT


class ServiceError(SetupError):
    """The service did not become active and stable."""

    exit_code = EX_UNAVAILABLE


class BusyError(SetupError):
    """Another command holds the lock on the credential set; try again later."""

    exit_code = EX_TEMPFAIL
