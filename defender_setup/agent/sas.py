"""Shared access signature (SAS) tokens for an IoT Hub module identity.

Interface (pure, no I/O):

- :func:`resource_uri` (host, device, module) -> ``"{host}/devices/{device}/modules/{module}"``
- :func:`make_token` (resource, key_b64, expiry, key_name=None) -> :class:`Token`
- :func:`renewal_delay` (lifetime) -> seconds after issue at which a token is renewed
- :func:`clock_looks_wrong` (now) -> a one-line hint or ``None``

A token reads ``SharedAccessSignature sr={url-encoded resource}&sig={url-encoded signature}
&se={expiry}``, where the signature is ``base64(HMAC-SHA256(base64decode(key), sr + "\\n" + se))``
and ``sr`` is the url-encoded resource (IoT Hub signs the encoded form). A module or device
identity's token carries no ``skn`` (that is for hub-level policies); the Device Provisioning
Service signs the same way and wants ``skn=registration`` (``key_name``).

:class:`Token` hides its text from ``repr`` so a token never lands in a log by accident; the key
itself never leaves :func:`make_token`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import urllib.parse
from dataclasses import dataclass, field

DEFAULT_LIFETIME = 3600  # seconds; IoT Hub accepts far longer, short limits a leaked token's use
# A token is renewed after this share of its lifetime, leaving a margin for a slow reconnect.
RENEW_SHARE = 0.8
# Before this date the clock has certainly not been set (Debian 11 was released in 2021).
_PLAUSIBLE_EPOCH = 1609459200  # 2021-01-01T00:00:00Z


def resource_uri(host_name: str, device_id: str, module_id: str) -> str:
    """The resource a module identity's token is scoped to (IDs are case-sensitive)."""
    return f"{host_name}/devices/{device_id}/modules/{module_id}"


@dataclass(frozen=True)
class Token:
    """A signed token; ``text`` is the MQTT password. ``repr`` shows only the expiry."""

    text: str = field(repr=False)
    resource: str
    expiry: int


def _decode_key(key_b64: str) -> bytes:
    try:
        key = base64.b64decode(key_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        # No part of the key in the message: it is a secret.
        raise ValueError("SharedAccessKey is not valid base64") from None
    if not key:
        raise ValueError("SharedAccessKey is empty")
    return key


def make_token(resource: str, key_b64: str, expiry: int, key_name: str | None = None) -> Token:
    """Sign ``resource`` with the base64 ``key_b64`` until the POSIX time ``expiry``;
    ``key_name`` adds ``skn`` (a policy's name; DPS: ``registration``).

    :raises ValueError: the key is not base64 (message never contains the key).
    """
    expiry = int(expiry)
    encoded = urllib.parse.quote(resource, safe="")  # IoT Hub signs the encoded form
    message = f"{encoded}\n{expiry}".encode()
    digest = hmac.new(_decode_key(key_b64), message, hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(digest).decode("ascii"), safe="")
    skn = f"&skn={urllib.parse.quote(key_name, safe='')}" if key_name else ""
    return Token(f"SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}{skn}", resource,
                 expiry)


def new_token(
    resource: str, key_b64: str, lifetime: int = DEFAULT_LIFETIME, now: float | None = None,
    key_name: str | None = None,
) -> Token:
    """A token valid for ``lifetime`` seconds from ``now`` (default: the system clock)."""
    issued = time.time() if now is None else now
    return make_token(resource, key_b64, int(issued) + int(lifetime), key_name)


def renewal_delay(lifetime: int) -> float:
    """Seconds after issuing a token of ``lifetime`` at which to reconnect with a fresh one."""
    return max(1.0, lifetime * RENEW_SHARE)


def clock_looks_wrong(now: float | None = None) -> str | None:
    """A hint when the system clock cannot be right (every token would look expired)."""
    now = time.time() if now is None else now
    if now < _PLAUSIBLE_EPOCH:
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now))
        return f"the system clock says {stamp}, which cannot be right (is NTP running?)"
    return None
