"""The provisioning core: every way in (apply, seal/unseal, the debconf bridge, the boot-time
import) reads the stored set, plans, commits and verifies the same way.

Interface::

    stored = read(agent, timeout=READ_WAIT)   # Stored: one snapshot under the shared lock,
                                              # each sealed file decrypted once
    p = plan(Request(...), stored)            # pure: the method, validation, "unchanged",
                                              # sealing, whether to probe; ValidationError
    lines = commit(agent, p)                  # under the writers' lock: store, record origin
    verify.settle(root, ...)                  # one restart, the verdict, roll back or
                                              # unconfigure (defender_setup.verify)

The adapters only read their inputs into a :class:`Request` and render what comes back, so
the rules hold on every entry point: an unchanged set writes nothing, keeps the previous
generation and is never probed (IoT Hub allows one connection per identity: a probe as the
running identity knocks the agent off the hub); a changed set moves the old one to the
previous generation; an invalid one changes nothing; a sealed set stays sealed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from . import connection_string as cs
from .credentials import (
    CERTIFICATE_FILE,
    CONNECTION_STRING_FILE,
    PRIVATE_KEY_FILE,
    Validated,
    load,
    method_of,
    validate,
)
from .errors import CERTIFICATE, CONNECTION_STRING, PRIVATE_KEY, ValidationError
from .sealing import (
    PENDING,
    Sealing,
    SealingError,
    deferral,
    open_set,
    plain_left,
    seal_previous,
    store,
)


@dataclass(frozen=True)
class Request:
    """What a way in asks for, its inputs as read (bytes); secrets kept out of ``repr``.

    ``connection_string`` None with a certificate or key: a new certificate for the stored
    certificate identity. ``method``: asked for explicitly (``--method``, debconf), checked
    against the connection string. ``seal``: True seal, False store plain (``unseal``), None
    keep the stored set's way (a sealed set stays sealed).
    """

    connection_string: bytes | None = field(default=None, repr=False)
    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    method: str | None = None
    seal: bool | None = None
    probe: bool = False
    origin: str = "apply"

    @classmethod
    def again(cls, stored: Stored, **kw) -> Request:
        """The stored set asked for again (``seal``, ``unseal``, debconf with nothing new)."""
        if stored.sealing.error:
            raise SealingError(f"{stored.sealing.error}; give the credentials again with "
                               "'defender-setup apply'")
        if stored.method is None:
            raise SealingError(f"not configured: no credentials in {stored.where}; configure "
                               "them first ('defender-setup apply' or 'dpkg-reconfigure "
                               "defender-setup')")
        plain = stored.plain
        return cls(plain.get(CONNECTION_STRING_FILE), plain.get(CERTIFICATE_FILE),
                   plain.get(PRIVATE_KEY_FILE), **kw)


@dataclass(frozen=True)
class Stored:
    """The stored set at one moment: read once, each sealed file decrypted once."""

    where: str
    files: dict = field(repr=False)   # as stored (sealed files sealed)
    plain: dict = field(repr=False)   # sealed files decrypted under their plain names
    sealing: Sealing
    modes: dict
    previous: bool                    # a previous generation to roll back to
    pending: bool                     # an interrupted update waits for repair
    origin: dict | None
    seal_pending: bool                # sealing waits for the first boot
    deferral: str | None              # why sealing would wait for the first boot here
    plain_left: tuple = ()            # plain secrets left behind a sealed set (previous)

    @property
    def method(self) -> str | None:
        return method_of(self.files)

    @property
    def sealed(self) -> bool:
        return bool(self.sealing.sealed) or self.seal_pending

    @cached_property
    def loaded(self) -> Validated:
        """The stored set validated with the rules for new input (once, then kept).

        :raises NotConfigured, ValidationError, SealingError: as ``credentials.load``, or a
            sealed file that does not decrypt here.
        """
        if self.sealing.error:
            raise SealingError(self.sealing.error)
        return load(self.plain, self.where)


def read(agent, timeout: float | None = None, runner=None, environ=None, defer=None) -> Stored:
    """The stored set under the readers' shared lock (never writes, never repairs).

    ``runner``, ``environ`` and ``defer`` are :mod:`.sealing`'s seams (tests seal in a
    throw-away root).

    :raises BusyError: a writer kept the lock ``timeout`` seconds.
    :raises UnsafeTargetError: the directory, a file or the private state is unsafe.
    """
    from .agentdir import READ_WAIT

    with agent.read_lock(READ_WAIT if timeout is None else timeout):
        return read_locked(agent, runner, environ, defer)


def read_locked(agent, runner=None, environ=None, defer=None) -> Stored:
    """:func:`read` for a writer that already holds the exclusive lock."""
    agent.check()
    files = agent.current()
    plain, how = open_set(files, runner)
    return Stored(where=str(agent.path), files=files, plain=plain, sealing=how,
                  modes=agent.modes(), previous=agent.has_previous(), pending=agent.pending(),
                  origin=agent.origin(), seal_pending=agent.record(PENDING) is not None,
                  deferral=(defer or deferral)(agent.root, environ),
                  plain_left=tuple(plain_left(agent, files)))


@dataclass(frozen=True)
class Plan:
    """What :func:`commit` does; ``validated.files`` hold the secrets (kept out of repr)."""

    request: Request
    validated: Validated
    unchanged: bool
    seal: bool
    probe: bool
    stored_files: dict = field(repr=False)  # what the plan was made against (raw)
    seal_previous: bool = False   # only a plain copy behind the sealed set is to be sealed


def plan(request: Request, stored: Stored, now=None, check=None) -> Plan:
    """Decide everything before anything is touched (pure).

    :param now: the time certificates are checked against (tests).
    :param check: the certificate checker (``credentials.validate``'s ``check``).
    :raises ValidationError: ``field`` (:class:`defender_setup.errors.Field`) names the input.
    """
    text = request.connection_string
    cert, key = request.certificate, request.private_key
    given = cert is not None or key is not None
    if text is None:
        if not (given and stored.method == cs.METHOD_CERTIFICATE
                and CONNECTION_STRING_FILE in stored.plain):
            raise ValidationError(CONNECTION_STRING, "is missing; give the module's connection "
                                  "string (SharedAccessKey=..., or x509=true with the "
                                  "certificate and its key)")
        text = stored.plain[CONNECTION_STRING_FILE]  # a new certificate, the same identity
    method = request.method or cs.method_of(text)
    if method == cs.METHOD_CONNECTION_STRING and given:
        raise ValidationError(CERTIFICATE if cert is not None else PRIVATE_KEY,
                              "was given, but the connection string uses SharedAccessKey; for "
                              "a certificate end the connection string with x509=true instead, "
                              "for SharedAccessKey give no certificate or key")
    validated = validate(method, text, cert, key, now=now, check=check)
    seal = stored.sealed if request.seal is None else request.seal
    same = {name: data for name, (data, _) in validated.files.items()} == stored.plain
    # Stored as asked: sealed (or waiting for the first boot where it cannot be sealed yet),
    # or plain with nothing pending.
    as_asked = (bool(stored.sealing.sealed) or (stored.seal_pending and stored.deferral)) \
        if seal else not stored.sealed
    unchanged = same and bool(as_asked) and not stored.pending and not stored.sealing.error
    # No plain copy stays behind a sealed set: sealed where it is (the rollback target kept),
    # unless sealing must wait for the first boot anyway.
    behind = seal and bool(stored.plain_left) and not stored.deferral
    return Plan(request, validated, unchanged and not behind, seal,
                request.probe and not same, dict(stored.files),
                seal_previous=unchanged and behind)


def commit(agent, p: Plan, runner=None, environ=None, defer=None) -> list[str]:
    """Store the plan's set (the caller holds the writers' lock); lines for the person.

    The set is compared again under the lock: when another command changed it since the
    plan was made, the request is planned again against what is there now.
    """
    if agent.current() != p.stored_files:
        p = plan(p.request, read_locked(agent, runner, environ, defer))
    if p.unchanged:
        return []
    if p.seal_previous:
        return seal_previous(agent, runner)
    v = p.validated
    return store(agent, v.files, v.method, p.seal, origin=p.request.origin, environ=environ,
                 runner=runner, defer=defer)


# Nothing stored: what ``validate`` plans against (new input judged on its own).
NOTHING_STORED = Stored(where="the agent directory", files={}, plain={}, sealing=Sealing(),
                        modes={}, previous=False, pending=False, origin=None,
                        seal_pending=False, deferral=None)


def digest(files: dict) -> str:
    """Which set something was decided for (a probe's outcome, a refused offer): a SHA-256
    over names and contents (``{name: bytes}`` or ``{name: (bytes, mode)}``), kept root-only
    beside the set itself; never the content."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name][0] if isinstance(files[name], tuple) else files[name]
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()
