"""Validate a complete credential set and turn it into the files the agent reads (pure).

Interface::

    validate(method, connection_string, certificate=None, private_key=None, now=None)
        -> Validated        # raises ValidationError
    load(files, where) -> Validated    # a stored set: raises NotConfigured, ValidationError

``Validated.files`` maps each file name of the agent directory to ``(content, mode)``; it is
exactly the set :meth:`defender_setup.agentdir.AgentDir.write` replaces atomically.

A secret file may be stored sealed instead (:mod:`defender_setup.sealing`): ``NAME.cred``,
encrypted by ``systemd-creds``, in place of ``NAME``. ``SEALED_NAMES`` maps each plain name
to its sealed one; ``ALL_FILES`` holds both, so every writer and reader knows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import connection_string as cs
from .errors import AUTH_METHOD, CERTIFICATE, PRIVATE_KEY, NotConfigured, ValidationError

CONNECTION_STRING_FILE = "connection_string.txt"
CERTIFICATE_FILE = "certificate_public.pem"
PRIVATE_KEY_FILE = "certificate_private.pem"
SEALED_SUFFIX = ".cred"
# The files holding a secret, by method: what sealing encrypts (the connection string of the
# certificate method ends in x509=true and holds none).
SECRET_FILES = {cs.METHOD_CONNECTION_STRING: (CONNECTION_STRING_FILE,),
                cs.METHOD_CERTIFICATE: (PRIVATE_KEY_FILE,)}
SEALED_NAMES = {name: name + SEALED_SUFFIX for name in (CONNECTION_STRING_FILE, PRIVATE_KEY_FILE)}
PLAIN_FILES = (CONNECTION_STRING_FILE, CERTIFICATE_FILE, PRIVATE_KEY_FILE)
ALL_FILES = PLAIN_FILES + tuple(SEALED_NAMES.values())
METHODS = (cs.METHOD_CONNECTION_STRING, cs.METHOD_CERTIFICATE)


@dataclass(frozen=True)
class Validated:
    """A credential set that passed every check; ``files`` hold secrets (kept out of repr)."""

    method: str
    connection_string: cs.ConnectionString
    certificate: object = None  # certificates.CertificateInfo (imported lazily)
    files: dict = field(default_factory=dict, repr=False)
    # Where each file can be read again, when loaded from storage (the agent's TLS files).
    sources: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def warnings(self) -> tuple[str, ...]:
        cert = self.certificate.warnings if self.certificate else ()
        return tuple(self.connection_string.warnings) + tuple(cert)

    def summary_lines(self) -> list[str]:
        """What was found, safe to print: identity and certificate facts, never a secret."""
        c = self.connection_string
        lines = [f"method:        {self.method}",
                 f"hub:           {c.host_name}"]
        if c.gateway_host_name:
            lines.append(f"gateway:       {c.gateway_host_name}")
        lines += [f"device:        {c.device_id}",
                  f"module:        {c.module_id}",
                  "authentication: " + ("X.509 certificate (x509=true)" if c.x509
                                        else "SharedAccessKey (redacted)")]
        if self.certificate is not None:
            from .certificates import describe
            lines += describe(self.certificate)
        return lines


def method_of(files: dict) -> str | None:
    """The method of a stored set (name -> content); None when unconfigured.

    The one rule, everywhere: the connection string decides (:func:`connection_string.method_of`:
    ``x509`` means the certificate method). No connection string means unconfigured; a sealed
    one holds a SharedAccessKey (the certificate method's holds no secret and is never sealed).
    Certificate files alone decide nothing.
    """
    if CONNECTION_STRING_FILE in files:
        return cs.method_of(files[CONNECTION_STRING_FILE])
    if SEALED_NAMES[CONNECTION_STRING_FILE] in files:
        return cs.METHOD_CONNECTION_STRING
    return None


def validate(method: str, connection_string: bytes | str, certificate: bytes | None = None,
             private_key: bytes | None = None, now=None, check=None) -> Validated:
    """Validate everything the chosen method needs.

    :param method: ``connection-string`` or ``certificate``.
    :param connection_string: as pasted; for the certificate method it carries ``x509=true``.
    :param certificate: PEM bytes of the certificate (chain allowed, leaf first).
    :param private_key: PEM bytes of the unencrypted private key.
    :param now: the time to check validity against (tests); defaults to the clock.
    :param check: what checks a certificate and its key, in place of
        :func:`defender_setup.certificates.check` (same signature and result); the agent
        passes :func:`defender_setup.agent.certcheck.check`, which runs it in a child process.
    """
    if method not in METHODS:
        raise ValidationError(AUTH_METHOD, f"must be one of {', '.join(METHODS)}")
    parsed = cs.parse(connection_string, method=method)
    files = {CONNECTION_STRING_FILE: ((parsed.canonical() + "\n").encode("ascii"), 0o600)}
    info = None
    if method == cs.METHOD_CERTIFICATE:
        # None: not given (the one place that says so, for new and stored sets alike). An
        # empty file was given: certificates.check says it is empty.
        if certificate is None and private_key is None:
            raise ValidationError(CERTIFICATE, "is missing: the connection string says "
                                  "x509=true; give the PEM certificate and its private key too")
        if private_key is None:
            raise ValidationError(PRIVATE_KEY, "is missing: a certificate was given without "
                                  "its private key; give both")
        if certificate is None:
            raise ValidationError(CERTIFICATE, "is missing: a private key was given without "
                                  "its certificate; give both")
        from . import certificates  # cryptography is only loaded when a certificate is involved
        info = (check or certificates.check)(certificate, private_key, now=now,
                                             device_id=parsed.device_id,
                                             module_id=parsed.module_id)
        # Written re-encoded from the parsed blocks: no BOM, CRLF or stray text reaches the agent.
        files[CERTIFICATE_FILE] = (certificates.normalize_certificate(certificate), 0o644)
        files[PRIVATE_KEY_FILE] = (certificates.normalize_private_key(private_key), 0o600)
    return Validated(method=method, connection_string=parsed, certificate=info, files=files)


def load(files: dict, where="the agent directory", check=None) -> Validated:
    """The one reader of a stored set: decide its method from the files present
    (:func:`method_of`) and validate it with the rules for new input.

    :param files: name -> content as stored (``AgentDir.current()``, a snapshot's files, or
        the service's credentials directory), sealed files already decrypted.
    :param where: where they were read, for the message of an unconfigured device.
    :param check: as for :func:`validate`.
    :raises NotConfigured: no connection string: the device is not configured.
    :raises ValidationError: the stored set breaks a rule (nothing is repaired here).
    """
    method = method_of(files)
    if method is None:
        raise NotConfigured(f"not configured: no {CONNECTION_STRING_FILE} in {where}; "
                            "configure with 'dpkg-reconfigure defender-setup' or "
                            "'defender-setup apply'")
    return validate(method, files[CONNECTION_STRING_FILE], files.get(CERTIFICATE_FILE),
                    files.get(PRIVATE_KEY_FILE), check=check)
