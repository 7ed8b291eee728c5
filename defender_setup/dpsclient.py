"""The network side of zero-touch provisioning: DPS registration and the hub's module REST API,
over HTTPS with the standard library only, every step bounded.

Interface::

    link = Link.of(enrollment, settings, bounds=Bounds())     # trust, proxy, client cert
    with link:                                                # closes the in-memory cert
        state = register(link, enrollment, clock=..., sleep=...) -> Assignment
        query(link, enrollment) -> Assignment                 # changes nothing (check)
        key, how = create_module(link, enrollment, state, key=None)  # base64 primary key,
                                                                      # "created"/"updated"
    Assignment(hub, device_id, substatus, status)
    DpsError(reason, message, exit_code, field)  # reason: unauthorized, disabled, throttled,
                                                 # unreachable, failed, protocol, not-found

Protocol (api-version 2021-06-01)::

    PUT  https://{endpoint}/{idScope}/registrations/{registrationId}/register
    GET  https://{endpoint}/{idScope}/registrations/{registrationId}/operations/{operationId}
    POST https://{endpoint}/{idScope}/registrations/{registrationId}   (status; no change)
    PUT  https://{hub}/devices/{deviceId}/modules/{moduleId}   (then with If-Match: * when
                                                                the module exists: 409)

Authentication: with a symmetric key, ``Authorization: SharedAccessSignature`` (DPS:
``skn=registration``; the hub: the device's token, ``sr={hub}/devices/{deviceId}``); with
X.509, the device certificate in the TLS handshake, handed to OpenSSL through an anonymous
memory file. Trust: the system CA store, or only ``ca_file`` of the agent's conf.json, which
also gives the proxy.

Bounds (:class:`Bounds`): a request without an answer is abandoned after ``request`` seconds
(30; a watchdog shuts the socket down, so a peer that trickles bytes cannot stretch it), and
registration with its polls and ``Retry-After`` waits, plus the module's creation, ends
within ``total`` seconds (120) with a named reason. Answers are read up to 64 KiB. Messages
hold status codes, DPS's error codes and its (escaped, shortened) message, never a key or a
token.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from . import __version__
from .dps import API_VERSION, X509, address
from .errors import EX_CONFIG, EX_DATAERR, EX_TEMPFAIL, EX_UNAVAILABLE, Field, SetupError, printable

HUB_API_VERSION = "2021-04-12"
MAX_BODY = 64 * 1024
USER_AGENT = f"defender-setup/{__version__}"
DEFAULT_POLL = 2.0   # seconds between polls when DPS sends no Retry-After
MIN_POLL = 0.1       # ... and at least this: "Retry-After: 0" must not make a busy loop


@dataclass(frozen=True)
class Bounds:
    """Seconds: one request (connect, TLS, answer), and registration + module in all."""

    request: float = 30.0
    total: float = 120.0


class DpsError(SetupError):
    """DPS or the hub said no, or could not be reached; ``reason`` names which (one word)."""

    def __init__(self, reason: str, message: str, exit_code: int = EX_UNAVAILABLE,
                 field: Field | None = None, part: str | None = None):
        super().__init__(message, field, part)
        self.reason, self.exit_code = reason, exit_code


@dataclass(frozen=True)
class Assignment:
    """What DPS says about the registration (never a secret)."""

    status: str
    hub: str | None = None
    device_id: str | None = None
    substatus: str | None = None


@dataclass
class Link:
    """How to reach DPS and the hub: TLS context (trust + client certificate), proxy, bounds."""

    ctx: ssl.SSLContext
    proxy: object
    bounds: Bounds
    trust: str
    hub_port: int = 443  # conf.json's https_port (test hubs)
    _fds: list = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, enrollment, settings, bounds: Bounds | None = None) -> Link:
        """``enrollment`` None: no client certificate (``check``'s reachability tests).

        :raises SetupError: the CA file or the client certificate cannot be loaded."""
        from .safefs import memory_file

        ca = settings.ca_file
        try:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise SetupError(f"cannot load the CA file {ca}: {exc}", Field.DPS_ENDPOINT) \
                from None
        link = cls(ctx, settings.proxy, bounds or Bounds(),
                   f"ca_file {ca}" if ca else "the system CA store", settings.https_port)
        if enrollment is not None and enrollment.attestation == X509:
            try:  # each memory file is the link's from the start: closed with it
                cert_fd, cert = memory_file("dps-certificate", enrollment.certificate)
                link._fds.append(cert_fd)
                key_fd, key = memory_file("dps-key", enrollment.private_key)
                link._fds.append(key_fd)
                ctx.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                link.__exit__()
                raise SetupError(f"cannot hand the certificate to TLS: {exc}", Field.CERTIFICATE) \
                    from None
        return link

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict
    body: dict


def _request(link: Link, host: str, port: int, method: str, path: str, body: dict | None,
             headers: dict, deadline: float) -> Answer:
    """One HTTPS request, answered within ``min(bounds.request, deadline)``."""
    from .hubpath import PathError, handshake, one_line, timed_out

    limit = min(link.bounds.request, deadline - time.monotonic())
    where = f"{host}:{port}" if port != 443 else host
    if limit <= 0:
        raise DpsError("timeout", f"{where}: out of time ({link.bounds.total:g} s in all)")
    started = time.monotonic()
    data = json.dumps(body).encode() if body is not None else b""
    try:
        sock = handshake(host, port, link.proxy, link.ctx, limit)
    except PathError as exc:
        raise DpsError("unreachable", f"cannot reach {where}: {exc.text}") from None
    except ssl.SSLCertVerificationError as exc:
        raise DpsError("unreachable", f"the certificate of {where} does not verify against "
                       f"{link.trust}: {exc.verify_message}") from None
    except OSError as exc:  # the handshake (an ssl.SSLError may refuse our certificate)
        if isinstance(exc, ssl.SSLError):
            _certificate_refused(exc, where)
        raise DpsError("unreachable", timed_out(where, limit) if _is_timeout(exc) else
                       f"{where}: TLS handshake failed: {one_line(exc)}") from None
    # A watchdog: socket timeouts bound each read, not a peer sending a byte a second.
    left = limit - (time.monotonic() - started)
    fired = threading.Event()
    guard = threading.Timer(max(0.0, left), _shut, (sock, fired))
    guard.daemon = True
    guard.start()
    try:
        sock.settimeout(max(0.05, left))
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"User-Agent: {USER_AGENT}",
                "Accept: application/json", "Connection: close",
                f"Content-Length: {len(data)}"]
        if body is not None:
            head.append("Content-Type: application/json; charset=utf-8")
        head += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        raw = response.read(MAX_BODY + 1)
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if isinstance(exc, ssl.SSLError):  # TLS 1.3 refuses a certificate after the handshake
            _certificate_refused(exc, where)
        if fired.is_set() or _is_timeout(exc):
            raise DpsError("unreachable", timed_out(where, limit)) from None
        raise DpsError("unreachable", f"{where}: the connection failed: {one_line(exc)}") \
            from None
    finally:
        guard.cancel()
        sock.close()
    if len(raw) > MAX_BODY:
        raise DpsError("protocol", f"{where}: its answer is larger than {MAX_BODY} bytes")
    try:
        parsed = json.loads(raw) if raw.strip() else {}
    except ValueError:
        parsed = {}
    return Answer(response.status, answer_headers, parsed if isinstance(parsed, dict) else {})


def _certificate_refused(exc: ssl.SSLError, where: str) -> None:
    """Raise "unauthorized" when the peer's TLS alert refuses our client certificate."""
    from .agent.verdicts import CERT_ALERTS

    alert = CERT_ALERTS.get(exc.reason or "")
    if alert:
        raise DpsError("unauthorized", f"unauthorized: {where} refused the device certificate "
                       f"(TLS alert: {alert}); check that DPS or the hub trusts its CA",
                       EX_DATAERR, Field.CERTIFICATE) from None


def _shut(sock, fired: threading.Event) -> None:
    fired.set()  # first: the reader that wakes up must know why
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _is_timeout(exc) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in str(exc)


def _said(answer: Answer) -> str:
    """DPS's or the hub's own words about an error: code and message, escaped, shortened."""
    body = answer.body
    code = body.get("errorCode") or body.get("ErrorCode")
    message = body.get("message") or body.get("Message") or ""
    text = printable(" ".join(str(message).split()))[:200]
    parts = [f"HTTP {answer.status}"] + ([f"error {printable(str(code))[:20]}"] if code else [])
    return ", ".join(parts) + (f": {text}" if text else "")


def _retry_after(answer: Answer, default: float) -> float:
    try:
        return max(0.0, min(float(answer.headers.get("retry-after", default)), 3600.0))
    except ValueError:
        return default


def _refused(answer: Answer, what: str, enrollment, where: str) -> DpsError:
    """A non-success answer as a named error."""
    said = _said(answer)
    key_field = Field.CERTIFICATE if enrollment.attestation == X509 else Field.DPS_KEY
    if answer.status in (401, 403):
        fix = ("check the device certificate and that its CA is verified in the enrollment"
               if enrollment.attestation == X509 else
               "check the key, and whether it is an enrollment group's key or the "
               "device's own")
        group = getattr(enrollment, "group_key", False) and key_field == Field.DPS_KEY
        return DpsError("unauthorized", f"unauthorized: {where} refused {what} ({said}); "
                        f"{fix}", EX_DATAERR, key_field,
                        "DPS enrollment group key" if group else None)
    if answer.status == 429:
        wait = _retry_after(answer, 0)
        return DpsError("throttled", f"throttled: {where} asks to wait "
                        f"{wait:g} s ({said}); try again later", EX_TEMPFAIL)
    if answer.status == 404:
        return DpsError("not-found", f"{where} does not know {what} ({said}); check the ID "
                        "scope and the endpoint", EX_CONFIG, Field.DPS_ID_SCOPE)
    return DpsError("failed", f"{where} failed {what} ({said})", EX_UNAVAILABLE)


def _dps_path(enrollment, tail: str = "") -> str:
    """The registration's path (+ ``tail``), with the api-version every DPS request names."""
    scope = urllib.parse.quote(enrollment.id_scope, safe="")
    reg = urllib.parse.quote(enrollment.registration_id, safe="")
    return f"/{scope}/registrations/{reg}{tail}?api-version={API_VERSION}"


def _dps_headers(enrollment, clock) -> dict:
    if enrollment.attestation == X509:
        return {}
    return {"Authorization": enrollment.registration_token(clock()).text}


def _assignment(state: dict, status: str) -> Assignment:
    return Assignment(status, state.get("assignedHub"), state.get("deviceId"),
                      state.get("substatus"))


def _outcome(body: dict, enrollment, where: str) -> Assignment | None:
    """The final word of a registration, or None while DPS is still assigning."""
    status = str(body.get("status") or "").lower()
    state = body.get("registrationState") if isinstance(body.get("registrationState"),
                                                        dict) else {}
    status = status or str(state.get("status") or "").lower()
    if status in ("", "assigning", "unassigned"):
        return None
    if status == "assigned":
        hub, device = state.get("assignedHub"), state.get("deviceId")
        if not isinstance(hub, str) or not isinstance(device, str) or not hub or not device:
            raise DpsError("protocol", f"{where} assigned the device but named no hub or "
                           "device ID")
        return _assignment(state, status)
    message = printable(" ".join(str(state.get("errorMessage") or "").split()))[:200]
    said = f" (error {printable(str(state.get('errorCode')))[:20]}: {message})" \
        if state.get("errorCode") or message else ""
    if status == "disabled":
        raise DpsError("disabled", f"disabled: the enrollment of {enrollment.registration_id} "
                       f"is disabled in DPS{said}; enable it (or its group) to provision "
                       "this device", EX_CONFIG, Field.DPS_ENROLLMENT)
    raise DpsError("failed", f"{where} could not assign {enrollment.registration_id}: "
                   f"{printable(status)[:20]}{said}", EX_CONFIG, Field.DPS_ENROLLMENT)


def register(link: Link, enrollment, *, clock=time.time, sleep=time.sleep,
             deadline: float | None = None) -> Assignment:
    """Register (PUT), then poll until DPS assigns the device, within ``bounds.total``.

    :raises DpsError: unauthorized (65), disabled (78), throttled (75), unreachable or out
        of time (69), failed (78).
    """
    deadline = deadline if deadline is not None else time.monotonic() + link.bounds.total
    where = f"DPS ({enrollment.endpoint})"
    host, port = address(enrollment.endpoint)
    answer = _request(link, host, port, "PUT", _dps_path(enrollment, "/register"),
                      {"registrationId": enrollment.registration_id},
                      _dps_headers(enrollment, clock), deadline)
    while True:
        if answer.status not in (200, 202):
            raise _refused(answer, f"the registration of {enrollment.registration_id}",
                           enrollment, where)
        done = _outcome(answer.body, enrollment, where)
        if done is not None:
            return done
        operation = answer.body.get("operationId")
        if not isinstance(operation, str) or not operation:
            raise DpsError("protocol", f"{where} is assigning but gave no operationId")
        wait = max(MIN_POLL, _retry_after(answer, DEFAULT_POLL))
        if time.monotonic() + wait >= deadline:
            raise DpsError("timeout", f"{where} did not assign {enrollment.registration_id} "
                           f"within {link.bounds.total:g} s (still assigning; it asks to wait "
                           f"{wait:g} s more); try again later")
        sleep(wait)
        path = _dps_path(enrollment, "/operations/" + urllib.parse.quote(operation, safe=""))
        answer = _request(link, host, port, "GET", path, None,
                          _dps_headers(enrollment, clock), deadline)


def query(link: Link, enrollment) -> Assignment:
    """The registration's current state (POST …/registrations/{id}): changes nothing."""
    where = f"DPS ({enrollment.endpoint})"
    answer = _request(link, *address(enrollment.endpoint), "POST", _dps_path(enrollment),
                      {"registrationId": enrollment.registration_id},
                      _dps_headers(enrollment, time.time), time.monotonic() + link.bounds.request)
    if answer.status != 200:
        raise _refused(answer, f"the status of {enrollment.registration_id}", enrollment, where)
    return _assignment(answer.body, str(answer.body.get("status") or "unknown"))


def new_key() -> str:
    """A module key made on the device: 32 random bytes, base64."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def create_module(link: Link, enrollment, assigned: Assignment, key: str | None = None, *,
                  clock=time.time, deadline: float | None = None) -> tuple[str, str]:
    """Create the module on the assigned hub with the device's credentials, or update it
    (``If-Match: *``) when it exists; ``key`` (the stored module key) keeps the same key.

    :returns: the module's primary key (base64) and ``"created"`` or ``"updated"``.
    :raises DpsError: as :func:`register`.
    """
    from .agent.sas import new_token

    deadline = deadline if deadline is not None else time.monotonic() + link.bounds.request
    hub, device, module = assigned.hub, assigned.device_id, enrollment.module_id
    primary, secondary = key or new_key(), new_key()
    headers = {}
    if enrollment.attestation != X509:
        headers["Authorization"] = new_token(f"{hub}/devices/{device}",
                                             enrollment.device_key.decode("ascii"),
                                             now=clock()).text
    body = {"deviceId": device, "moduleId": module,
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": primary,
                                                               "secondaryKey": secondary}}}
    path = (f"/devices/{urllib.parse.quote(device, safe='')}/modules/"
            f"{urllib.parse.quote(module, safe='')}?api-version={HUB_API_VERSION}")
    where = f"the hub {hub}"
    answer = _request(link, hub, link.hub_port, "PUT", path, body, headers, deadline)
    how = "created"
    if answer.status == 409:  # it exists: replace its keys with ours
        how = "updated"
        answer = _request(link, hub, link.hub_port, "PUT", path, body,
                          {**headers, "If-Match": "*"}, deadline)
    if answer.status not in (200, 201):
        raise _refused(answer, f"the module {device}/{module}", enrollment, where)
    return primary, how

