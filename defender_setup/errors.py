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

import enum

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
EX_TERMINATED = 143  # SIGTERM during provisioning's network part, as shells report it (128 + 15)


@enum.unique  # two fields with one label would silently become one field
class Field(enum.Enum):
    """What an error is about: the key callers route by (the debconf bridge maps each to its
    question, the import to the file or credential it read). Its value is what a person calls
    the input, the prefix of its errors ("certificate: ..."): rewording one changes no
    routing."""

    AUTH_METHOD = "authentication method"
    CONNECTION_STRING = "connection string"
    CERTIFICATE = "certificate"
    PRIVATE_KEY = "private key"
    HUB_HOSTNAME = "IoT Hub host name"  # the certificate method's identity questions
    DEVICE_ID = "device id"
    MODULE_ID = "module id"
    SEALING = "credential sealing"
    DPS_ID_SCOPE = "DPS ID scope"  # zero-touch provisioning through DPS (defender_setup.dps)
    DPS_REGISTRATION_ID = "DPS registration ID"
    DPS_ATTESTATION = "DPS attestation"
    DPS_KEY = "DPS symmetric key"  # the enrollment's symmetric key or group key
    DPS_ENDPOINT = "DPS endpoint"
    DPS_ENROLLMENT = "DPS enrollment"  # what DPS says about the enrollment (disabled, failed)

    def __str__(self) -> str:  # in a message, a field reads as its label
        return self.value


AUTH_METHOD = Field.AUTH_METHOD
CONNECTION_STRING = Field.CONNECTION_STRING
CERTIFICATE = Field.CERTIFICATE
PRIVATE_KEY = Field.PRIVATE_KEY
HUB_HOSTNAME = Field.HUB_HOSTNAME
DEVICE_ID = Field.DEVICE_ID
MODULE_ID = Field.MODULE_ID


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
    """Base class; ``exit_code`` is what the CLI exits with, ``field`` what it is about.

    ``part`` narrows the field for a person: the connection string's key (``SharedAccessKey``)
    or the file an input was read from; it replaces the field's label in the message.
    """

    exit_code = EX_CONFIG

    def __init__(self, message: str, field: Field | None = None, part: str | None = None):
        super().__init__(message)
        self.message, self.field, self.part = message, field, part

    @property
    def label(self) -> str | None:
        return self.part or (self.field.value if self.field else None)

    def __str__(self) -> str:
        return f"{self.label}: {self.message}" if self.label else self.message


class NotConfigured(SetupError):
    """No credential set is stored (no connection string): the device is not configured
    (exit 78, :data:`EX_CONFIG`, as every :class:`SetupError`)."""


class ValidationError(SetupError):
    """Invalid credentials: ``field`` names what is wrong (e.g. ``SharedAccessKey``)."""

    exit_code = EX_DATAERR

    def __init__(self, field: Field, message: str, part: str | None = None):
        super().__init__(message, field, part)


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
