"""Authenticate an IoT Hub module identity's MQTT CONNECT with a SAS token.

Written from IoT Hub's documented rules, on purpose without importing the agent's ``sas``
module (a shared bug would otherwise pass its own test)::

    auth = SasAuth(hub="h.example", devices={("dev", "mod"): key_b64}, clock=time.time)
    auth(client_id, username, password) -> 0 (accepted) | 4 | 5 (CONNACK codes), with .last_reason
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote, unquote


class SasAuth:
    def __init__(self, hub: str, devices: dict, clock=time.time):
        self.hub, self.devices, self.clock = hub, dict(devices), clock
        self.last_reason = ""
        self.last_expiry = None

    def __call__(self, client_id: str, username: str | None, password: bytes | None) -> int:
        device, _, module = client_id.partition("/")
        key = self.devices.get((device, module))
        if key is None:
            return self._no(5, f"unknown identity {client_id!r}")
        expected_user = f"{self.hub}/{device}/{module}/?api-version="
        if not username or not username.startswith(expected_user):
            return self._no(4, f"bad user name {username!r}")
        if not password:
            return self._no(4, "no password")
        text = password.decode("utf-8", "replace")
        prefix = "SharedAccessSignature "
        if not text.startswith(prefix):
            return self._no(4, "not a SharedAccessSignature")
        fields = {}
        for part in text[len(prefix):].split("&"):
            name, _, value = part.partition("=")
            fields[name] = value
        if set(fields) - {"sr", "sig", "se", "skn"} or not {"sr", "sig", "se"} <= set(fields):
            return self._no(4, f"token fields {sorted(fields)}")
        resource = f"{self.hub}/devices/{device}/modules/{module}"
        if unquote(fields["sr"]) != resource:
            return self._no(5, f"resource {unquote(fields['sr'])!r} is not {resource!r}")
        try:
            expiry = int(fields["se"])
        except ValueError:
            return self._no(4, "se is not a number")
        self.last_expiry = expiry
        if expiry <= self.clock():
            return self._no(5, f"token expired at {expiry}")
        to_sign = f"{quote(resource, safe='')}\n{expiry}".encode()
        digest = hmac.new(base64.b64decode(key), to_sign, hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64encode(digest).decode(), unquote(fields["sig"])):
            return self._no(5, "signature mismatch")
        self.last_reason = "accepted"
        return 0

    def _no(self, code: int, reason: str) -> int:
        self.last_reason = reason
        return code
