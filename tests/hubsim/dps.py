"""A Device Provisioning Service on loopback (HTTPS, real TLS), assigning devices to HubRest hubs.

Interface::

    dps = DpsSim(pki, id_scope, hubs={name: HubRest}, client_ca=None, polls=1,
                 retry_after=0)
    dps.start(port=0) -> port; dps.stop()
    dps.individual(registration_id, key, hub, disabled=False)    # a symmetric-key enrollment
    dps.group(name, group_key, hub, disabled=False)               # an enrollment group (key)
    dps.x509_group(name, hub, disabled=False)   # CA attestation: certificates client_ca signed
    dps.reassign(registration_id, hub)          # the next registration goes to another hub
    dps.disable(name_or_registration_id, disabled=True)
    dps.throttle = 30                           # answer 429 with Retry-After: 30
    dps.assigning_forever = True                # keep answering "assigning"
    dps.server.stall = True                     # finish TLS, never answer (tests.hubsim.https)
    dps.registrations                           # {registration_id: registrationState}

Protocol (api-version 2021-06-01), written from the documentation, independent of the client:
``PUT /{idScope}/registrations/{id}/register`` answers 202 ``{"operationId", "status":
"assigning"}`` (``Retry-After``); ``GET …/operations/{operationId}`` answers ``assigning``
for ``polls - 1`` more polls, then ``assigned`` with ``registrationState`` (``assignedHub``,
``deviceId`` = the registration ID, ``substatus``), or ``disabled``; ``POST
/{idScope}/registrations/{id}`` returns the registration's state and changes nothing. A SAS
token (``sr={idScope}/registrations/{id}``, ``skn=registration``) signed with the
enrollment's key, or with the key derived from a group's
(``base64(HMAC-SHA256(base64decode(groupKey), registrationId))``), or a client certificate
whose CN is the registration ID, verified by ``client_ca``; anything else is 401. On
assignment the device is added to the hub (its key, or as an X.509 device).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import threading
import time

from tests.hubsim.https import JsonServer, Served
from tests.hubsim.hubrest import check_sas

API_VERSION = "2021-06-01"


def derive(group_key: str, registration_id: str) -> str:
    raw = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(raw.digest()).decode()


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DpsSim(Served):
    def __init__(self, pki, id_scope: str, hubs: dict, client_ca=None, polls: int = 1,
                 retry_after: float = 0, host: str = "127.0.0.1", clock=time.time):
        self.id_scope, self.hubs, self.polls, self.retry_after = id_scope, hubs, polls, \
            retry_after
        self.clock = clock
        self.enrollments: dict = {}   # registration id -> {"key", "hub", "disabled"}
        self.groups: dict = {}        # name -> {"key" | "x509", "hub", "disabled"}
        self.assigned_to: dict = {}   # registration id -> hub name (re-assignment)
        self.registrations: dict = {}  # registration id -> registrationState
        self.operations: dict = {}    # operation id -> [registration id, polls left, enrollment]
        self.refusals: list = []
        self.throttle: float | None = None
        self.assigning_forever = False
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = JsonServer(self._handle, (pki.server_cert, pki.server_key),
                                 client_ca=client_ca, host=host)

    # -- control ----------------------------------------------------------------------------
    def individual(self, registration_id: str, key: str, hub: str, disabled=False) -> None:
        self.enrollments[registration_id] = {"key": key, "hub": hub, "disabled": disabled}

    def group(self, name: str, group_key: str, hub: str, disabled=False) -> None:
        self.groups[name] = {"key": group_key, "hub": hub, "disabled": disabled}

    def x509_group(self, name: str, hub: str, disabled=False) -> None:
        self.groups[name] = {"x509": True, "hub": hub, "disabled": disabled}

    def reassign(self, registration_id: str, hub: str) -> None:
        self.assigned_to[registration_id] = hub

    def disable(self, name: str, disabled: bool = True) -> None:
        target = self.enrollments.get(name) or self.groups.get(name)
        target["disabled"] = disabled

    # -- protocol ---------------------------------------------------------------------------
    def _refuse(self, why: str):
        self.refusals.append(why)
        return 401, {"errorCode": 401002, "trackingId": "hubsim",
                     "message": "Invalid certificate or SAS token.", "timestampUtc": _stamp()}, {}

    def _enrollment(self, req, reg: str):
        """(enrollment dict, device key or None) for this request, or None: unauthorized."""
        if req.peer_cn is not None and req.peer_cn == reg:
            for group in self.groups.values():
                if group.get("x509"):
                    return (group, None), None
        resource = f"{self.id_scope}/registrations/{reg}"
        header, now = req.headers.get("authorization"), self.clock()
        mine = self.enrollments.get(reg)
        if mine is not None:
            why = check_sas(header, resource, mine["key"], now, skn="registration")
            return ((mine, mine["key"]) if why is None else None), why
        why = "no enrollment"
        for group in self.groups.values():
            if "key" in group:
                device_key = derive(group["key"], reg)
                why = check_sas(header, resource, device_key, now, skn="registration")
                if why is None:
                    return (group, device_key), None
        return None, why

    def _handle(self, req):
        if self.throttle is not None:
            return 429, {"errorCode": 429001, "message": "Operations are being throttled.",
                         "trackingId": "hubsim"}, {"Retry-After": f"{self.throttle:g}"}
        parts = req.path.strip("/").split("/")
        if req.query.get("api-version") != API_VERSION or len(parts) < 3 \
                or parts[1] != "registrations":
            return 404, {"errorCode": 404001, "message": "Not found"}, {}
        if parts[0] != self.id_scope:
            return self._refuse(f"unknown ID scope {parts[0]!r}")
        reg = parts[2]
        found, why = self._enrollment(req, reg)
        if found is None:
            return self._refuse(f"{reg}: {why}")
        enrollment, device_key = found
        with self._lock:
            if req.method == "PUT" and parts[3:] == ["register"]:
                if req.body.get("registrationId") != reg:
                    return 400, {"errorCode": 400004, "message": "registrationId"}, {}
                op = f"4.{next(self._ids):016x}.hubsim"
                self.operations[op] = [reg, self.polls, enrollment, device_key]
                return 202, {"operationId": op, "status": "assigning"}, self._wait()
            if req.method == "GET" and len(parts) == 5 and parts[3] == "operations":
                return self._poll(parts[4], reg)
            if req.method == "POST" and len(parts) == 3:
                state = self.registrations.get(reg)
                if state is None:
                    return 404, {"errorCode": 404201, "message": "Registration not found"}, {}
                return 200, state, {}
        return 404, {"errorCode": 404001, "message": "Not found"}, {}

    def _wait(self) -> dict:
        return {"Retry-After": f"{self.retry_after:g}"}

    def _poll(self, op: str, reg: str):
        entry = self.operations.get(op)
        if entry is None or entry[0] != reg:
            return 404, {"errorCode": 404002, "message": "Operation not found"}, {}
        entry[1] -= 1
        _, left, enrollment, device_key = entry
        if left > 0 or self.assigning_forever:
            return 202, {"operationId": op, "status": "assigning"}, self._wait()
        if enrollment["disabled"]:
            state = {"registrationId": reg, "status": "disabled", "errorCode": 401010,
                     "errorMessage": "Enrollment is disabled"}
            return 200, {"operationId": op, "status": "disabled",
                         "registrationState": state}, {}
        hub = self.assigned_to.get(reg, enrollment["hub"])
        before = self.registrations.get(reg)
        substatus = "initialAssignment" if before is None else \
            "reprovisionedToNewHub" if before["assignedHub"] != hub else \
            "reprovisionedToInitialAssignment"
        self.hubs[hub].add_device(reg, key=device_key, x509=device_key is None)
        now = _stamp()
        state = {"registrationId": reg, "createdDateTimeUtc": now, "assignedHub": hub,
                 "deviceId": reg, "status": "assigned", "substatus": substatus,
                 "lastUpdatedDateTimeUtc": now, "etag": f'"{next(self._ids)}"'}
        self.registrations[reg] = state
        del self.operations[op]
        return 200, {"operationId": op, "status": "assigned", "registrationState": state}, {}
