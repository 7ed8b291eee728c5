"""The hub's module REST API, joined to the MQTT test hub: a module created here can CONNECT.

Interface::

    rest = HubRest(name, auth, pki, client_ca=None)   # auth: the broker's SasAuth
    rest.start(port=0) -> port; rest.stop()
    rest.add_device(device_id, key=None, x509=False)  # what DPS does on assignment
    rest.remove_device(device_id)                     # and its modules (a deleted device)
    rest.delete_module(device_id, module_id)
    rest.modules                                      # {(device, module): primary key}
    rest.refuse_all = True                            # 401 for every request
    rest.server.requests                              # every request (tests.hubsim.https)

``PUT /devices/{deviceId}/modules/{moduleId}?api-version=…``: creates the module (200), or
409 when it exists unless ``If-Match`` is given (``*`` or its etag: updated, 200). It is
authenticated as the DEVICE: a SAS token with ``sr={hub}/devices/{deviceId}`` signed with
the device key, or a client certificate whose CN is the device ID, verified by ``client_ca``
(X.509 devices); anything else is 401. The module's primary key then authenticates
``{device}/{module}`` on the MQTT hub (``auth.devices``). Written from the documented
protocol, independent of the client under test.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
import time
from urllib.parse import quote, unquote

from tests.hubsim.https import JsonServer, Served


def check_sas(header: str | None, resource: str, key_b64: str, now: float,
              skn: str | None = None) -> str | None:
    """Why a SAS token does not authenticate ``resource`` with ``key_b64`` (None: it does)."""
    prefix = "SharedAccessSignature "
    if not header or not header.startswith(prefix):
        return "no SharedAccessSignature"
    fields = dict(part.partition("=")[::2] for part in header[len(prefix):].split("&"))
    if not {"sr", "sig", "se"} <= set(fields):
        return f"token fields {sorted(fields)}"
    if unquote(fields["sr"]) != resource:
        return f"resource {unquote(fields['sr'])!r} is not {resource!r}"
    if skn is not None and fields.get("skn") != skn:
        return f"skn {fields.get('skn')!r} is not {skn!r}"
    try:
        expiry = int(fields["se"])
        key = base64.b64decode(key_b64)
    except (ValueError, binascii.Error):
        return "se or key unusable"
    if expiry <= now:
        return "token expired"
    to_sign = f"{quote(resource, safe='')}\n{expiry}".encode()
    digest = base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(digest, unquote(fields["sig"])):
        return "signature mismatch"
    return None


class HubRest(Served):
    def __init__(self, name: str, auth, pki, client_ca=None, host: str = "127.0.0.1",
                 clock=time.time):
        self.name, self.auth, self.clock = name, auth, clock
        self.devices: dict = {}    # device id -> {"key": b64 | None, "x509": bool}
        self.modules: dict = {}    # (device, module) -> primary key
        self.refusals: list = []   # why each 401 was given
        self.refuse_all = False
        self._lock = threading.Lock()
        self.server = JsonServer(self._handle, (pki.server_cert, pki.server_key),
                                 client_ca=client_ca, host=host)

    def add_device(self, device_id: str, key: str | None = None, x509: bool = False) -> None:
        with self._lock:
            self.devices[device_id] = {"key": key, "x509": x509}

    def remove_device(self, device_id: str) -> None:
        with self._lock:
            self.devices.pop(device_id, None)
            for device, module in [k for k in self.modules if k[0] == device_id]:
                self.delete_module(device, module)

    def delete_module(self, device_id: str, module_id: str) -> None:
        self.modules.pop((device_id, module_id), None)
        self.auth.devices.pop((device_id, module_id), None)

    def _refuse(self, why: str):
        self.refusals.append(why)
        return 401, {"Message": "ErrorCode:IotHubUnauthorizedAccess;Unauthorized",
                     "ExceptionMessage": ""}, {}

    def _handle(self, req):
        parts = req.path.strip("/").split("/")
        if req.method != "PUT" or len(parts) != 4 or parts[0] != "devices" \
                or parts[2] != "modules":
            return 404, {"Message": "ErrorCode:NotFound"}, {}
        device, module = parts[1], parts[3]
        if self.refuse_all:
            return self._refuse("refusing everyone")
        with self._lock:
            known = self.devices.get(device)
            if known is None:
                return self._refuse(f"unknown device {device!r}")
            if known["x509"]:
                if req.peer_cn != device:
                    return self._refuse(f"client certificate CN {req.peer_cn!r}")
            else:
                why = check_sas(req.headers.get("authorization"), f"{self.name}/devices/{device}",
                                known["key"] or "", self.clock())
                if why:
                    return self._refuse(why)
            auth = req.body.get("authentication") or {}
            primary = (auth.get("symmetricKey") or {}).get("primaryKey")
            if req.body.get("moduleId") != module or auth.get("type") != "sas" or not primary:
                return 400, {"Message": "ErrorCode:ArgumentInvalid"}, {}
            exists = (device, module) in self.modules
            if exists and not req.headers.get("if-match"):
                return 409, {"Message": "ErrorCode:ModuleAlreadyExistsOnDevice"}, {}
            self.modules[(device, module)] = primary
            self.auth.devices[(device, module)] = primary
        return 200, {"deviceId": device, "moduleId": module, "etag": "AAAAAAAAAAE=",
                     "authentication": {"type": "sas"}}, {}
