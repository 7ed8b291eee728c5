"""What the hub's answers mean: a :class:`Result` per outcome, with the line a person reads.

Interface::

    Result(kind, text="", answer="", cause="")   # kind: unreachable, rejected, lost, renew,
                                                 # stopped (and callers' own, e.g. accepted)
    connack_verdict(code, ident, host, where, token, now) -> Result      # a CONNACK != 0
    certificate_refused(identity, alert, now) -> Result                  # a TLS alert
    CONNACK_TEXT, CERT_ALERTS

A rejection's ``text`` names the likely cause (wrong key, unregistered thumbprint, ID case,
clock skew with the local time and the token's expiry); ``answer`` is the hub's answer alone
(``CONNACK 5, not authorized``) and ``cause`` the likely causes alone, for callers that phrase
their own line. CONNACK 3 (server unavailable) and codes MQTT 3.1.1 does not define are
network conditions (``unreachable``), not answers about this identity. No text holds a secret.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CONNACK_TEXT = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
# TLS alerts a server sends about the client's certificate: the hub refuses this identity.
CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
}


@dataclass(frozen=True)
class Result:
    """How one attempt ended: ``kind`` and the one-line ``text`` (see the module docstring)."""

    kind: str
    text: str = ""
    answer: str = ""  # rejected: what the hub said ("CONNACK 5, not authorized")
    cause: str = ""   # rejected: the likely causes, as in ``text`` after its head


def connack_verdict(code: int, ident, host: str, where: str, token, now: float) -> Result:
    """The meaning of CONNACK ``code`` (not 0) for ``ident`` (hub.Identity); ``host`` is
    where TLS went, ``where`` host:port, ``token`` the SAS token used (None for X.509)."""
    if code not in CONNACK_TEXT:  # MQTT 3.1.1 defines 0-5: not an answer about us
        return Result("unreachable", f"MQTT: invalid CONNACK return code {code} from "
                                     f"{where} (MQTT 3.1.1 defines 0 to 5)")
    text = CONNACK_TEXT[code]
    head = f"hub rejected {ident.name}: {text} (CONNACK {code})"
    if code == 3:
        return Result("unreachable", f"MQTT: hub unavailable ({text}, CONNACK 3)")

    def rejected(cause: str) -> Result:
        return Result("rejected", f"{head}: {cause}", f"CONNACK {code}, {text}", cause)

    if code == 2:
        return rejected(f"check DeviceId '{ident.device_id}' and ModuleId "
                        f"'{ident.module_id}' (IDs are case-sensitive)")
    if code == 1:
        return rejected(f"{host} does not speak MQTT 3.1.1 as IoT Hub does; "
                        "check HostName/GatewayHostName")
    from defender_setup.agent import sas

    clock_hint = sas.clock_looks_wrong(now)
    if clock_hint:
        return rejected(f"most likely clock skew: {clock_hint}")
    ids = f"DeviceId '{ident.device_id}', ModuleId '{ident.module_id}' (IDs are case-sensitive)"
    if token is not None:
        return rejected(f"likely a wrong SharedAccessKey, no module identity {ids}, or clock "
                        f"skew (token valid until {iso(token.expiry)}, local time "
                        f"{iso(now)})")
    thumb = f" {ident.thumbprint}" if ident.thumbprint else ""
    return rejected(f"likely the certificate thumbprint{thumb} is not registered for {ids}, "
                    f"or the certificate is not valid at the local time {iso(now)}")


def certificate_refused(identity, alert: str, now: float) -> Result:
    """The hub refused ``identity``'s client certificate with a TLS ``alert`` (a value of
    :data:`CERT_ALERTS`); also for callers that hear the alert on a connection of their own."""
    thumb = f" (SHA-1 thumbprint {identity.thumbprint})" if identity.thumbprint else ""
    cause = (f"the certificate{thumb} or its CA is not registered with the hub, or it is not "
             f"valid at the local time {iso(now)}")
    return Result("rejected", f"hub rejected the client certificate of {identity.name} during "
                              f"TLS ({alert}): {cause}", f"TLS alert: {alert}", cause)


def iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
