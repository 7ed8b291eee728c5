"""Parse, normalise and validate IoT Hub module connection strings (pure, no I/O).

Interface::

    parse(text, *, method=None) -> ConnectionString      # raises ValidationError

``text`` is what a person pasted (``str`` or ``bytes``). The rules follow the IoT Hub SDKs:
``;``-separated ``Key=Value`` pairs split at the first ``=`` (so base64 padding survives), keys
case-sensitive, exactly one authentication. What people paste by accident (a UTF-8 BOM,
surrounding whitespace and line breaks, one pair of straight or typographic quotes) is removed;
anything else that is not plain ASCII is refused with its position.

No message ever contains a value that could be secret: errors name known keys, positions and
lengths, never text from the input (a part that breaks the rules may be a misplaced key).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from . import DEFAULT_MODULE_ID
from .errors import CONNECTION_STRING as FIELD
from .errors import ValidationError
from .inputs import CONNECTION_STRING_MAX as MAX_BYTES


def _key_error(key: str, message: str) -> ValidationError:
    """An error about one key of the connection string: routed as the connection string,
    shown with the key's name."""
    return ValidationError(FIELD, message, part=key)


HOST_NAME = "HostName"
DEVICE_ID = "DeviceId"
MODULE_ID = "ModuleId"
SHARED_ACCESS_KEY = "SharedAccessKey"
SHARED_ACCESS_KEY_NAME = "SharedAccessKeyName"
SHARED_ACCESS_SIGNATURE = "SharedAccessSignature"
X509 = "x509"
GATEWAY_HOST_NAME = "GatewayHostName"
KNOWN_KEYS = (HOST_NAME, DEVICE_ID, MODULE_ID, SHARED_ACCESS_KEY, SHARED_ACCESS_KEY_NAME,
              SHARED_ACCESS_SIGNATURE, X509, GATEWAY_HOST_NAME)

METHOD_CONNECTION_STRING = "connection-string"
METHOD_CERTIFICATE = "certificate"

# Quote pairs people paste from documents and chat tools (the official page shows “…”).
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201d": "\u201d", "\u2018": "\u2019",
           "\u201e": "\u201c", "\u00ab": "\u00bb"}
_ID_RE = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ID_MAX = 128
_KEY_BYTES = (16, 64)


@dataclass(frozen=True)
class ConnectionString:
    """A validated connection string; ``shared_access_key`` is kept out of ``repr``."""

    host_name: str
    device_id: str
    module_id: str
    shared_access_key: str | None = field(default=None, repr=False)
    x509: bool = False
    gateway_host_name: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return METHOD_CERTIFICATE if self.x509 else METHOD_CONNECTION_STRING

    def _pairs(self, key: str) -> str:
        pairs = [(HOST_NAME, self.host_name), (DEVICE_ID, self.device_id),
                 (MODULE_ID, self.module_id)]
        if self.gateway_host_name:
            pairs.append((GATEWAY_HOST_NAME, self.gateway_host_name))
        pairs.append((X509, "true") if self.x509 else (SHARED_ACCESS_KEY, key))
        return ";".join(f"{k}={v}" for k, v in pairs)

    def canonical(self) -> str:
        """The one-line form written to ``connection_string.txt`` (no newline)."""
        return self._pairs(self.shared_access_key or "")

    def redacted(self) -> str:
        """The canonical form with the key replaced, safe to print."""
        return self._pairs("<redacted>")


def normalise(text: str | bytes) -> str:
    """Strip what pasting adds (BOM, whitespace, CR/LF, one pair of quotes) and require ASCII.

    :raises ValidationError: for oversized text, undecodable bytes, inner line breaks or
        non-ASCII characters.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "replace"))
    if size > MAX_BYTES:
        raise ValidationError(FIELD, f"is {size} bytes long; a connection string is at most "
                              f"{MAX_BYTES} bytes (is it the right file?)")
    if isinstance(text, bytes):
        if text.startswith(b"\xef\xbb\xbf"):
            text = text[3:]
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(FIELD, f"is not valid UTF-8 (byte {exc.start + 1}); save the "
                                  "file as UTF-8 text") from None
    text = text.lstrip("\ufeff").strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if "\n" in text or "\r" in text:
        raise ValidationError(FIELD, "spans several lines; it must be a single line (join the "
                              "lines, e.g. if your editor wrapped it)")
    for pos, char in enumerate(text, 1):
        if not (" " <= char <= "~"):
            hint = " (a typographic quote? retype it as a plain \" or remove it)" \
                if char in _QUOTES or char in _QUOTES.values() else ""
            raise ValidationError(FIELD, f"character {pos} is not plain ASCII "
                                  f"(U+{ord(char):04X}){hint}; retype that part by hand")
    if not text:
        raise ValidationError(FIELD, "is empty; paste the module's connection string from the "
                              "Azure portal (IoT Hub > device > module identity)")
    return text


def _split(text: str) -> dict[str, str]:
    segments = text.split(";")
    if segments[-1] == "":  # one trailing ';' is harmless and common in copied strings
        segments.pop()
    pairs: dict[str, str] = {}
    for number, segment in enumerate(segments, 1):
        # A part that breaks the rules may be a key pasted in the wrong place: it is named by
        # its position and length, never by its text; only a known key's name is printed.
        where = f"part {number} ({len(segment)} character{'s' * (len(segment) != 1)})"
        if not segment:
            raise ValidationError(FIELD, f"part {number} is empty (two ';' in a row?); remove "
                                  "the extra ';'")
        if "=" not in segment:
            raise ValidationError(FIELD, f"{where} has no '=' (expected Key=Value pairs "
                                  "separated by ';')" + _bare_key_hint(segment))
        key, value = segment.split("=", 1)
        if key != key.strip() or value != value.strip():
            name = key.strip() if key.strip() in KNOWN_KEYS else where
            raise ValidationError(FIELD, f"{name} has spaces around its key or value; "
                                  "remove them")
        if key not in KNOWN_KEYS:
            raise ValidationError(FIELD, _unknown_key_message(segment, key, where))
        if key in pairs:
            raise _key_error(key, "appears twice; keep exactly one")
        if not value:
            raise _key_error(key, "is empty; fill in its value")
        pairs[key] = value
    return pairs


def _unknown_key_message(segment: str, key: str, where: str) -> str:
    for known in KNOWN_KEYS:
        if key.lower() == known.lower():
            return f"{where} is not a known key: did you mean {known}? (keys are case-sensitive)"
    return (f"{where} is not a known key; expected {', '.join(KNOWN_KEYS[:4])}, {X509} or "
            f"{GATEWAY_HOST_NAME}" + _bare_key_hint(segment))


def _bare_key_hint(segment: str) -> str:
    """A hint when a part is base64 like a key: pasted without ``SharedAccessKey=``."""
    try:
        raw = base64.b64decode(segment, validate=True)
    except (binascii.Error, ValueError):
        return ""
    low, high = _KEY_BYTES
    if not low <= len(raw) <= high:
        return ""
    return f" (it looks like a key without its name: write {SHARED_ACCESS_KEY}= before it)"


def _check_host(key: str, value: str, *, need_dot: bool) -> None:
    if "://" in value or "/" in value:
        raise _key_error(key, "must be a bare host name such as myhub.azure-devices.net "
                              "(no https:// or path)")
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise _key_error(key, "is not a valid DNS host name (letters, digits, '-' and "
                              "'.' only), e.g. myhub.azure-devices.net")
    if need_dot and len(labels) < 2:
        raise _key_error(key, "must be the hub's full host name, e.g. "
                              "myhub.azure-devices.net")


def check_id(key: str, value: str) -> None:
    if len(value) > _ID_MAX:
        raise _key_error(key, f"is {len(value)} characters long; IoT Hub allows at most "
                              f"{_ID_MAX}")
    if not _ID_RE.fullmatch(value):
        bad = next(pos for pos, char in enumerate(value, 1) if not _ID_RE.fullmatch(char))
        raise _key_error(key, f"character {bad} is not allowed; IDs use letters, digits "
                              "and - . % _ * ? ! ( ) , : = @ $ '")


def _check_key(value: str) -> None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _key_error(SHARED_ACCESS_KEY, "is not valid base64 (did you paste it with "
                              "quotes, cut it short or lose its trailing '='?)") from None
    low, high = _KEY_BYTES
    if not low <= len(raw) <= high:
        raise _key_error(SHARED_ACCESS_KEY, f"decodes to {len(raw)} bytes; IoT Hub keys "
                              f"are {low}-{high} bytes (usually 44 base64 characters): copy "
                              "the whole primary key")


def _module_warnings(module_id: str) -> tuple[str, ...]:
    """The one place that judges the ModuleId: every way in (validate, apply, debconf, the
    boot-time import) prints these warnings from ``Validated.warnings``. A warning, not an
    error: a module may be named otherwise on purpose. The value passed the ID rules, and
    ``status`` shows it anyway: it is no secret."""
    if module_id == DEFAULT_MODULE_ID:
        return ()
    if module_id.lower() == DEFAULT_MODULE_ID.lower():  # e.g. DefenderIoTMicroAgent
        return (f"{MODULE_ID} '{module_id}' differs from the expected {DEFAULT_MODULE_ID} only "
                "in letter case: IDs are case-sensitive, so the hub knows it as another "
                f"module; use {DEFAULT_MODULE_ID} unless you created this one on purpose",)
    return (f"{MODULE_ID} '{module_id}' is not the expected {DEFAULT_MODULE_ID}, the micro "
            "agent's module identity; keep it only if this module exists on the hub on "
            "purpose",)


def method_of(text: str | bytes) -> str:
    """The method a connection string asks for, before (and whatever) validation says: a
    ``x509`` key means the certificate method. A key, not a substring: a DeviceId holding
    ``x509=true`` is still a SharedAccessKey string."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    keys = {part.split("=", 1)[0].strip().lower() for part in text.split(";")}
    return METHOD_CERTIFICATE if X509 in keys else METHOD_CONNECTION_STRING


def parse(text: str | bytes, *, method: str | None = None) -> ConnectionString:
    """Parse and validate a module connection string.

    :param text: the connection string as pasted (str or bytes).
    :param method: ``"connection-string"`` requires ``SharedAccessKey``, ``"certificate"``
        requires ``x509=true``; ``None`` accepts either.
    :raises ValidationError: with the offending key as ``field``; never containing the key.
    """
    pairs = _split(normalise(text))
    if SHARED_ACCESS_KEY_NAME in pairs:
        raise _key_error(SHARED_ACCESS_KEY_NAME, "this is a hub-level policy connection "
                              "string, not a device identity; copy the connection string of "
                              f"the device's {DEFAULT_MODULE_ID} module identity instead")
    if SHARED_ACCESS_SIGNATURE in pairs:
        raise _key_error(SHARED_ACCESS_SIGNATURE, "a fixed SAS token expires and the "
                              "agent cannot renew it; use the module's SharedAccessKey "
                              "connection string instead")
    for key in (HOST_NAME, DEVICE_ID, MODULE_ID):
        if key not in pairs:
            extra = " (the micro agent runs as a module identity, usually " \
                f"{MODULE_ID}={DEFAULT_MODULE_ID})" if key == MODULE_ID else ""
            raise _key_error(key, f"is missing{extra}; add {key}=...")
    _check_host(HOST_NAME, pairs[HOST_NAME], need_dot=True)
    if GATEWAY_HOST_NAME in pairs:
        _check_host(GATEWAY_HOST_NAME, pairs[GATEWAY_HOST_NAME], need_dot=False)
    check_id(DEVICE_ID, pairs[DEVICE_ID])
    check_id(MODULE_ID, pairs[MODULE_ID])

    has_key, has_x509 = SHARED_ACCESS_KEY in pairs, X509 in pairs
    if has_key and has_x509:
        raise ValidationError(FIELD, "has both SharedAccessKey and x509; keep exactly one "
                              "authentication")
    if not has_key and not has_x509:
        raise ValidationError(FIELD, "has no authentication; add SharedAccessKey=... "
                              "(connection-string method) or x509=true (certificate method)")
    if has_x509 and pairs[X509] != "true":
        raise _key_error(X509, "must be exactly 'true' (lowercase)")
    if has_key:
        _check_key(pairs[SHARED_ACCESS_KEY])
    if method == METHOD_CONNECTION_STRING and has_x509:
        raise _key_error(X509, "x509=true belongs to the certificate method; choose the "
                              "certificate method or use the SharedAccessKey connection string")
    if method == METHOD_CERTIFICATE and has_key:
        raise _key_error(SHARED_ACCESS_KEY, "the certificate method authenticates with "
                              "the certificate; replace SharedAccessKey=... with x509=true")
    return ConnectionString(
        host_name=pairs[HOST_NAME], device_id=pairs[DEVICE_ID], module_id=pairs[MODULE_ID],
        shared_access_key=pairs.get(SHARED_ACCESS_KEY), x509=has_x509,
        gateway_host_name=pairs.get(GATEWAY_HOST_NAME),
        warnings=_module_warnings(pairs[MODULE_ID]))


def from_parts(host_name: str, device_id: str, module_id: str = DEFAULT_MODULE_ID) -> str:
    """Build an ``x509=true`` connection string from the certificate method's questions."""
    return f"{HOST_NAME}={host_name};{DEVICE_ID}={device_id};{MODULE_ID}={module_id};{X509}=true"
