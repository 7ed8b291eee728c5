"""Domain exceptions and every exit code of the package (the CLI's and the agent's).

Every error carries a message a person can act on and never the secret itself: callers build
messages from field names, positions and lengths, not from values.
"""

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


class SetupError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = EX_CONFIG

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationError(SetupError):
    """Invalid credentials: ``field`` names what is wrong (e.g. ``SharedAccessKey``)."""

    exit_code = EX_DATAERR

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InputError(SetupError):
    """An input file is missing or unreadable."""

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
