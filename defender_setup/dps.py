"""What a device needs to provision itself through the Azure Device Provisioning Service (DPS),
validated (pure: no network; the machine id is the one file read).

Interface::

    GLOBAL_ENDPOINT, DEFAULT_MODULE, API_VERSION, SYMMETRIC_KEY, X509, ATTESTATIONS
    e = enrollment(id_scope, registration_id=None, *, symmetric_key=None, group_key=None,
                   certificate=None, private_key=None, endpoint=None, module_id=None,
                   root="/", now=None) -> Enrollment     # checked; raises ValidationError
    e = Enrollment(...).checked(root="/", now=None)      # the same, from the fields
    e.device_key -> bytes           # base64: the key itself, or derived from a group key
    e.registration_token(now, lifetime) -> sas.Token    # sr={idScope}/registrations/{id},
                                                        # skn=registration
    address(endpoint) -> (host, port)   # HOST or HOST:PORT (443 unless named), checked
    derive_device_key(group_key_b64, registration_id) -> bytes
    machine_id(root) -> str         # /etc/machine-id under root; ValidationError when unset
    check_id_scope / check_registration_id / check_key / check_endpoint(text) -> str
    looks_like_key(text) -> bool    # a file name that is a key: never repeated

The rules are DPS's own: an ID scope looks like ``0ne00000A0A`` (``0ne`` and 8 hexadecimal
digits); a registration ID is at most 128 characters of lowercase letters, digits and
``- . _ :``, beginning and ending with a letter or digit; a symmetric key is base64 of 16 to
64 bytes. With an enrollment group key the device's own key is derived as
``base64(HMAC-SHA256(base64decode(groupKey), registrationId))``, so the group key itself is
needed only to compute it and is never kept. With X.509 the registration ID is the device
certificate's CN; one given as well must be the same.

Errors are one line naming the field (:class:`defender_setup.errors.Field`'s ``DPS_*``,
``CERTIFICATE``, ``PRIVATE_KEY``) and the fix, never the key; keys and the private key stay
out of ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import DEFAULT_MODULE_ID
from .connection_string import MODULE_ID, check_id
from .errors import CERTIFICATE, PRIVATE_KEY, Field, ValidationError, printable

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"
DEFAULT_MODULE = DEFAULT_MODULE_ID
API_VERSION = "2021-06-01"
SYMMETRIC_KEY, X509 = "symmetric-key", "x509"
ATTESTATIONS = (SYMMETRIC_KEY, X509)
HTTPS_PORT = 443
REGISTRATION_ID_MAX = 128
KEY_BYTES = (16, 64)
MACHINE_ID = "etc/machine-id"  # relative to a root

_SCOPE_RE = re.compile(r"0ne[0-9A-Fa-f]{8}")
_REG_RE = re.compile(r"[a-z0-9]([a-z0-9._:-]*[a-z0-9])?")
_REG_CHAR = re.compile(r"[a-z0-9._:-]")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")


def check_id_scope(text: str) -> str:
    """The ID scope, stripped; :raises ValidationError: not ``0ne`` + 8 hex digits."""
    value = text.strip()
    if _SCOPE_RE.fullmatch(value):
        return value
    hint = ""
    if value[:3].lower() in ("one", "0ne") and value[:3] != "0ne":
        hint = " (it begins with the digit zero and a lowercase 'ne')"
    shown = f"'{printable(value[:20])}'" if value else "empty"
    raise ValidationError(Field.DPS_ID_SCOPE, f"{shown} is not an ID scope; it looks like "
                          f"0ne00000A0A: '0ne' and 8 hexadecimal digits{hint} (the ID Scope "
                          "on the DPS overview page)")


def check_registration_id(text: str, what: str = "") -> str:
    """The registration ID, stripped; :raises ValidationError: DPS would refuse it.

    :param what: where the ID came from, for the message (``"the certificate's CN"``).
    """
    value = text.strip()
    where = f" ({what})" if what else ""
    if not value:
        raise ValidationError(Field.DPS_REGISTRATION_ID, f"is empty{where}; give the "
                              "device's registration ID (--registration-id)")
    if len(value) > REGISTRATION_ID_MAX:
        raise ValidationError(Field.DPS_REGISTRATION_ID, f"is {len(value)} characters "
                              f"long{where}; DPS allows at most {REGISTRATION_ID_MAX}")
    if not _REG_RE.fullmatch(value):
        if value.lower() != value and _REG_RE.fullmatch(value.lower()):
            problem = "has uppercase letters; DPS registration IDs are lowercase: write it " \
                      "in lowercase"
        else:
            bad = next((pos for pos, char in enumerate(value, 1)
                        if not _REG_CHAR.fullmatch(char)), None)
            problem = (f"character {bad} is not allowed" if bad is not None else
                       "must begin and end with a letter or digit") + \
                "; DPS registration IDs use lowercase letters, digits and - . _ : only, " \
                "and begin and end with a letter or digit"
        raise ValidationError(Field.DPS_REGISTRATION_ID, f"{problem}{where}")
    return value


def check_key(key_b64: bytes | str, group: bool = False) -> bytes:
    """The base64 key, stripped of surrounding blanks; :raises ValidationError: not base64 of
    16 to 64 bytes (the message never holds the key)."""
    raw_text = key_b64.encode() if isinstance(key_b64, str) else bytes(key_b64)
    text = raw_text.strip()
    which = "DPS enrollment group key" if group else None
    if not text:
        raise ValidationError(Field.DPS_KEY, "is empty; give the enrollment's primary key",
                              part=which)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(Field.DPS_KEY, "is not valid base64 (did you paste it with "
                              "quotes, cut it short or lose its trailing '='?)",
                              part=which) from None
    low, high = KEY_BYTES
    if not low <= len(raw) <= high:
        raise ValidationError(Field.DPS_KEY, f"decodes to {len(raw)} bytes; DPS keys are "
                              f"{low}-{high} bytes (usually 88 base64 characters): copy the "
                              "whole primary key", part=which)
    return text


def looks_like_key(text: str) -> bool:
    """Whether ``text`` (a file name given where a key file was asked for) is a key itself:
    then it must not be repeated in a message."""
    try:
        check_key(text)
    except ValidationError:
        return False
    return True


def check_endpoint(text: str) -> str:
    """``HOST`` or ``HOST:PORT`` (a private endpoint, a test stand-in), stripped."""
    address(text)
    return text.strip()


def address(endpoint: str) -> tuple[str, int]:
    """The host and port of ``HOST`` or ``HOST:PORT`` (443 unless named): the one place an
    endpoint is split. :raises ValidationError: (DPS_ENDPOINT) not such an endpoint."""
    value = endpoint.strip()
    host, sep, port = value.rpartition(":")
    host, port = (host, port) if sep else (value, None)
    problem = None
    if "://" in value or "/" in value:
        problem = "must be a bare host name such as global.azure-devices-provisioning.net " \
                  "(no https:// or path)"
    elif port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        problem = "has a port that is not a number from 1 to 65535 (HOST or HOST:PORT)"
    elif len(host) > 253 or not all(_LABEL_RE.fullmatch(label)
                                    for label in host.rstrip(".").split(".")):
        problem = "is not a valid DNS host name (letters, digits, '-' and '.'), e.g. " \
                  f"{GLOBAL_ENDPOINT}"
    if problem:
        raise ValidationError(Field.DPS_ENDPOINT, problem)
    return host, HTTPS_PORT if port is None else int(port)


def derive_device_key(group_key_b64: bytes | str, registration_id: str) -> bytes:
    """The device key an enrollment group gives ``registration_id`` (base64 bytes):
    ``base64(HMAC-SHA256(base64decode(groupKey), registrationId))``."""
    key = base64.b64decode(group_key_b64, validate=True)
    digest = hmac.new(key, registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest)


def machine_id(root: Path | str = "/") -> str:
    """This machine's ID (``/etc/machine-id`` under ``root``): the default registration ID.

    :raises ValidationError: (DPS_REGISTRATION_ID) absent, empty or ``uninitialized`` (an
        image before its first boot), or not 32 hexadecimal digits.
    """
    path = Path(root) / MACHINE_ID
    try:
        with open(path, "rb") as handle:  # a small file of the system's; at most 64 bytes
            text = handle.read(64).decode("ascii", "replace").strip()
    except OSError as exc:
        text, why = "", exc.strerror
    else:
        why = "empty" if not text or text == "uninitialized" else None
    if why is not None:
        raise ValidationError(Field.DPS_REGISTRATION_ID, f"not given, and /{MACHINE_ID} "
                              f"cannot give it ({why}: an image before its first boot?); "
                              "give --registration-id, or provision after the first boot")
    if not _MACHINE_ID_RE.fullmatch(text):
        raise ValidationError(Field.DPS_REGISTRATION_ID, f"not given, and /{MACHINE_ID} does "
                              "not hold a machine ID (32 hexadecimal digits); give "
                              "--registration-id")
    return text


@dataclass(frozen=True)
class Enrollment:
    """One device's DPS enrollment, as given (``checked()`` validates and completes it).

    ``key``: the base64 key as read (the device's own, or with ``group_key`` the enrollment
    group's); ``certificate``/``private_key``: PEM, for ``x509``. Secrets stay out of repr.
    """

    id_scope: str
    registration_id: str | None
    attestation: str
    key: bytes | None = field(default=None, repr=False)
    group_key: bool = False
    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    endpoint: str = GLOBAL_ENDPOINT
    module_id: str = DEFAULT_MODULE

    def checked(self, root: Path | str = "/", now=None) -> Enrollment:
        """Every field validated, the registration ID filled in (the machine ID, or the
        certificate's CN), the key stripped.

        :param now: the time the certificate is checked against (tests).
        :raises ValidationError: one line naming the field and the fix.
        """
        scope = check_id_scope(self.id_scope)
        endpoint = check_endpoint(self.endpoint or GLOBAL_ENDPOINT)
        module = (self.module_id or DEFAULT_MODULE).strip()
        try:
            check_id(MODULE_ID, module)  # the hub's rules for a module ID
        except ValidationError as exc:  # about --module (debconf: module-id), not a string
            raise ValidationError(Field.MODULE_ID, exc.message) from None
        if self.attestation not in ATTESTATIONS:
            raise ValidationError(Field.DPS_ATTESTATION, f"must be {' or '.join(ATTESTATIONS)}")
        given = None if self.registration_id is None or not self.registration_id.strip() \
            else check_registration_id(self.registration_id)
        if self.attestation == SYMMETRIC_KEY:
            if self.certificate is not None or self.private_key is not None:
                raise ValidationError(CERTIFICATE if self.certificate is not None
                                      else PRIVATE_KEY, "was given with a symmetric key; give "
                                      "either a key or a certificate and its private key")
            if self.key is None:
                raise ValidationError(Field.DPS_KEY, "is missing; give --symmetric-key-file "
                                      "or --group-key-file (or a certificate and its key)")
            key = check_key(self.key, self.group_key)
            reg = given or machine_id(root)
            return replace(self, id_scope=scope, registration_id=reg, key=key,
                           endpoint=endpoint, module_id=module)
        if self.key is not None:
            raise ValidationError(Field.DPS_KEY, "was given with a certificate; give either "
                                  "a key or a certificate and its private key")
        if self.certificate is None or self.private_key is None:
            missing = CERTIFICATE if self.certificate is None else PRIVATE_KEY
            raise ValidationError(missing, "is missing; X.509 attestation needs the device "
                                  "certificate and its private key (--certificate and "
                                  "--private-key)")
        from .certificates import check, normalize_certificate, normalize_private_key

        info = check(self.certificate, self.private_key, now=now)
        if not info.common_name:
            raise ValidationError(CERTIFICATE, "has no CN; with X.509 attestation the leaf "
                                  "certificate's CN is the registration ID")
        reg = check_registration_id(info.common_name, "the certificate's CN")
        if given is not None and given != reg:
            raise ValidationError(Field.DPS_REGISTRATION_ID, f"'{given}' is not the "
                                  f"certificate's CN '{reg}'; with X.509 the registration ID "
                                  "is the CN: leave --registration-id out")
        return replace(self, id_scope=scope, registration_id=reg, endpoint=endpoint,
                       module_id=module, certificate=normalize_certificate(self.certificate),
                       private_key=normalize_private_key(self.private_key))

    @property
    def device_key(self) -> bytes | None:
        """The device's own base64 key (derived from a group key); None for X.509."""
        if self.key is None:
            return None
        if self.group_key:
            return derive_device_key(self.key, self.registration_id)
        return self.key

    def registration_token(self, now: float, lifetime: int = 3600):
        """The SAS token DPS wants with a symmetric key (``skn=registration``)."""
        from .agent.sas import new_token

        resource = f"{self.id_scope}/registrations/{self.registration_id}"
        return new_token(resource, self.device_key.decode("ascii"), lifetime, now,
                         key_name="registration")


def enrollment(id_scope: str, registration_id: str | None = None, *,
               symmetric_key: bytes | None = None, group_key: bytes | None = None,
               certificate: bytes | None = None, private_key: bytes | None = None,
               endpoint: str | None = None, module_id: str | None = None,
               root: Path | str = "/", now=None) -> Enrollment:
    """An :class:`Enrollment` from what each way in read, checked (see ``checked``).

    One of ``symmetric_key``, ``group_key`` or ``certificate`` + ``private_key``.
    """
    if symmetric_key is not None and group_key is not None:
        raise ValidationError(Field.DPS_KEY, "give either the device's symmetric key or the "
                              "enrollment group key, not both")
    x509 = certificate is not None or private_key is not None
    key = symmetric_key if symmetric_key is not None else group_key
    return Enrollment(id_scope=id_scope, registration_id=registration_id,
                      attestation=X509 if x509 and key is None else SYMMETRIC_KEY,
                      key=key, group_key=group_key is not None,
                      certificate=certificate, private_key=private_key, endpoint=endpoint,
                      module_id=module_id).checked(root, now)  # checked() fills in defaults
