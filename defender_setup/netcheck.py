"""The network checks of ``defender-setup check``: the path from this machine to the hub.

Interface::

    NETWORK_IDS = ("hub-dns", "hub-tcp", "hub-tls", "hub-clock", "hub-auth")
    extend(root, results, service_state=None, *, offline=False, dont_run=(),
           budget=BUDGET, https_port=None, clock=time.time) -> list[CheckResult]
    run_in_order(checks, shared, needs, descriptions, *, offline=False, dont_run=(),
                 blocked=None, budget, kind) -> list[CheckResult]  # the DPS checks' loop too

``extend`` takes the local checks' results (:func:`defender_setup.checks.run_checks`) and
returns them followed by ``agent-settings`` (conf.json, local) and the network checks, each
one bounded (:data:`PER_CHECK` seconds) and all of them together by ``budget``, so a
monitoring job can run ``check`` every minute even when the hub is unreachable. They use what
the agent uses: the stored identity and conf.json (transport, port, proxy, ``ca_file``).

- ``hub-dns``: the hub's name (or GatewayHostName) resolves; with a proxy, the proxy's name
  resolves and it answers (the proxy resolves the hub). This is the one lookup: the checks
  after it connect to the addresses it found (a second lookup could wait as long as glibc
  likes), while TLS still verifies, and HTTP and the proxy still name, the host.
- ``hub-tcp``: the port connects; when 8883 fails and 443 answers, it says to use WebSocket.
- ``hub-tls``: the server certificate verifies against the agent's trust and the host name.
- ``hub-clock``: the local clock against the ``Date`` of the hub's HTTPS answer (443, or the
  WebSocket port); more than 5 minutes off is an error, more than 30 s a warning.
- ``hub-auth``: the hub accepts the stored identity (one CONNECT, closed at once). When the
  running agent already reports ``connected`` as this identity, its status is the answer: IoT
  Hub allows one connection per identity, and a second one would knock the agent off.

A check whose prerequisite failed is ``skipped``; ``--dont-run`` and ``--offline`` make checks
``skipped`` without blocking the others. Nothing here writes anything. What the hub's
certificate says is shown with its control characters escaped.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
import ssl
import threading
import time
from pathlib import Path

from . import hubpath
from .agent import hubnet
from .agent import settings as settings_mod
from .agentdir import AgentDir
from .checks import ERROR, OK, SKIPPED, WARNING, CheckResult
from .credentials import SEALED_NAMES
from .errors import EX_CONFIG, EX_DATAERR, EX_OK, EX_UNAVAILABLE, SetupError, printable
from .safefs import memory_file

NETWORK_IDS = ("hub-dns", "hub-tcp", "hub-tls", "hub-clock", "hub-auth")
PER_CHECK = 3.0   # seconds, each network check
BUDGET = 8.0      # seconds, all of them: `check` stays under 10 s with the hub unreachable
CLOCK_ERROR, CLOCK_WARNING = 300, 30   # seconds of skew
CONF = f"/{settings_mod.CONF_PATH}"  # as messages name it

DESCRIPTIONS = {
    "agent-settings": "conf.json is valid (transport, port, proxy, ca_file)",
    "hub-dns": "the hub's name resolves (through the proxy when one is set)",
    "hub-tcp": "the hub's port accepts a TCP connection",
    "hub-tls": "the hub's TLS certificate verifies against the agent's trust",
    "hub-clock": "the local clock agrees with the hub's",
    "hub-auth": "the hub accepts the stored identity",
}
# A check runs only when these passed (or were deliberately not run).
NEEDS = {"hub-tcp": ("hub-dns",), "hub-tls": ("hub-tcp",), "hub-clock": ("hub-dns",),
         "hub-auth": ("hub-tls",)}


@dataclasses.dataclass
class _Path:
    """What the checks share: settings, identity, and what earlier checks learnt."""

    settings: object
    identity: object
    method: str
    service_state: dict | None
    https_port: int  # the caller's (tests), else conf.json's: 443 unless a test hub's
    clock: object
    alt_open: bool | None = None   # hub-tcp: whether 443 answered when the port is 8883
    addresses: list | None = None  # hub-dns: the first hop's (hubpath.first_hop)

    def __post_init__(self):
        self.host, self.port = self.identity.connect_host, self.settings.hub_port
        self.where = f"{self.host}:{self.port}"

    @functools.cached_property
    def link(self) -> hubnet.Link:  # made once, when a check first needs it
        return hubnet.Link(self.identity, self.settings)

    def trust(self) -> str:
        ca = self.settings.ca_file
        return f"ca_file {ca}" if ca else "the system CA store (/etc/ssl/certs)"


def extend(root: Path, results: list, service_state: dict | None = None, *,
           offline: bool = False, dont_run=(), budget: float = BUDGET,
           https_port: int | None = None, clock=time.time, stored=None) -> list[CheckResult]:
    """See the module docstring. ``https_port`` replaces 443 (tests): the clock's source, and
    the port tried when the MQTT port does not answer."""
    skip = set(dont_run)
    out = [CheckResult(r.id, r.description, SKIPPED, "not run (--dont-run)") if r.id in skip
           else r for r in results]

    def add(check_id, status, message="", code=EX_OK):
        out.append(CheckResult(check_id, DESCRIPTIONS[check_id], status, message, code))

    settings = _settings(Path(root), add, "agent-settings" in skip)
    path, needs = None, NEEDS
    blocked = None if offline else _blocker(results, settings)
    if blocked is None and not offline:
        try:
            path = _path(Path(root), settings, service_state, https_port, clock, stored)
        except SetupError as err:
            blocked = f"stored credentials cannot be read: {err}"
    if path is not None and path.settings.transport == "websocket":
        needs = {**NEEDS, "hub-clock": ("hub-dns", "hub-tls")}  # the same endpoint as hub-tls
    return out + run_in_order(CHECKS, path, needs, DESCRIPTIONS, offline=offline,
                              dont_run=skip, blocked=blocked, budget=budget, kind="network")


def run_in_order(checks: dict, shared, needs: dict, descriptions: dict, *, offline=False,
                 dont_run=(), blocked: str | None = None, budget: float,
                 kind: str) -> list[CheckResult]:
    """Run ``checks`` (id -> check(shared, seconds) -> (status, message, exit code)) in
    order, each within :data:`PER_CHECK` seconds and all of them within ``budget``.

    With ``offline`` every check is skipped as not run (--offline), whatever else is given;
    else a check in ``dont_run`` is skipped, else every check when ``blocked`` (the reason)
    is given; a check whose prerequisites (``needs``: id -> ids) failed or were skipped is
    skipped naming them, and counts as failed for what needs it in turn. The network and
    the DPS checks (``kind``, for the message) run through here.
    """
    if offline:  # the one rule for both kinds: it wins over --dont-run and every reason
        blocked, dont_run = "not run (--offline)", ()
    out: list[CheckResult] = []
    failed: set = set()
    deadline = time.monotonic() + budget
    for check_id, check in checks.items():
        waiting = [n for n in needs.get(check_id, ()) if n in failed]
        left = deadline - time.monotonic()
        if check_id in dont_run:
            result = SKIPPED, "not run (--dont-run)", EX_OK
        elif blocked is not None:
            result = SKIPPED, blocked, EX_OK
        elif waiting:
            failed.add(check_id)
            result = SKIPPED, f"needs {', '.join(waiting)}", EX_OK
        elif left < 0.5:  # not a failure: what depends on it meets the same end
            result = SKIPPED, f"not run: the {kind} checks' {budget:g} s are used up", EX_OK
        else:
            result = check(shared, min(PER_CHECK, left))
            if result[0] in (ERROR, SKIPPED):
                failed.add(check_id)
        out.append(CheckResult(check_id, descriptions[check_id], *result))
    return out


def _settings(root: Path, add, not_run: bool):
    """conf.json's settings, or None when the agent could not use them; ``agent-settings``
    says which (or that it was not run: listed all the same)."""
    try:
        settings, problem = settings_mod.load(root), None
        if settings.proxy is not None:
            settings_mod.socks_for(settings.proxy)
    except SetupError as err:
        settings, problem = None, str(err)
    if not_run:
        add("agent-settings", SKIPPED, "not run (--dont-run)")
    elif problem:
        add("agent-settings", ERROR, problem, EX_CONFIG)
    else:
        proxy = f", proxy {settings.proxy.describe()}" if settings.proxy else ""
        trust = f"trusting only {settings.ca_file}" if settings.ca_file else \
            "trusting the system CA store"
        add("agent-settings", OK, f"{settings.transport} on port {settings.hub_port}{proxy}, "
                                  f"{trust}")
    return settings


def _blocker(results: list, settings) -> str | None:
    status = {r.id: r.status for r in results}
    if status.get("credentials-valid") not in (OK, WARNING):
        return "needs valid stored credentials (credentials-valid)"
    if settings is None:
        return "needs a valid conf.json (agent-settings)"
    return None


def _path(root: Path, settings, service_state, https_port, clock, stored=None) -> _Path:
    """The path to test, for the set the local checks passed (``stored``: the same snapshot;
    read again only when called without one)."""
    from .agent.hub import Identity
    from .provision import read

    stored = stored if stored is not None else read(AgentDir(root))
    validated = stored.loaded
    # TLS opens the certificate and key by name: where they lie, or (a sealed key) an
    # anonymous memory file that never touches a disk.
    sources = {name: Path(stored.where) / name for name in stored.files}
    for name, sealed in SEALED_NAMES.items():
        if sealed in stored.files and name in stored.plain:
            sources[name] = memory_file(name, stored.plain[name])[1]  # open while we run
    validated = dataclasses.replace(validated, sources=sources)
    return _Path(settings, Identity.from_credentials(validated, root), validated.method,
                 service_state, https_port or settings.https_port, clock)


# -- the checks: (path, seconds) -> (status, message, exit code) ----------------------------
def _dns(p: _Path, limit: float):
    proxy = p.settings.proxy
    start = time.monotonic()
    try:
        infos = hubpath.first_hop(p.host, p.port, proxy, limit)
    except hubpath.PathError as err:
        if proxy is not None:  # the text names the proxy's name
            return ERROR, f"{err.text}; check \"proxy\" in {CONF}", EX_UNAVAILABLE
        which = "GatewayHostName" if p.identity.gateway_host_name else "HostName"
        return ERROR, (f"{err.text}: check {which} in the connection string, and the name "
                       "server in /etc/resolv.conf"), EX_UNAVAILABLE
    if proxy is None:
        p.addresses = infos
        return OK, f"{p.host} resolves to {hubpath.addresses(infos)}", EX_OK
    try:
        hubpath.open_tcp(proxy.host, proxy.port, None, limit - (time.monotonic() - start),
                         infos).close()
    except hubpath.PathError as err:
        return ERROR, f"the proxy {proxy.describe()} does not answer: {err.text}", \
            EX_UNAVAILABLE
    p.addresses = infos
    return OK, (f"proxy {proxy.describe()} resolves to {hubpath.addresses(infos)} and "
                f"answers; the proxy resolves {p.host}"), EX_OK


def _tcp(p: _Path, limit: float):
    outcome: dict = {}  # port -> None (it connected) or the PathError

    def reach(port):
        try:
            hubpath.open_tcp(p.host, port, p.settings.proxy, limit, p.addresses).close()
            outcome[port] = None
        except hubpath.PathError as err:
            outcome[port] = err

    start = time.monotonic()
    alt = p.https_port
    # 443 is tried alongside the MQTT port, not after: it says whether WebSocket would do,
    # and is the clock's source, at no extra wait
    ports = [p.port, alt] if p.settings.transport == "mqtt" and p.port != alt else [p.port]
    workers = [threading.Thread(target=reach, args=(port,), daemon=True) for port in ports]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(max(0.0, limit + 0.5 - (time.monotonic() - start)))
    if alt != p.port and alt in outcome:
        p.alt_open = outcome[alt] is None
    via = f" through the proxy {p.settings.proxy.describe()}" if p.settings.proxy else ""
    error = outcome.get(p.port, hubpath.PathError("TCP", f"no answer from {p.where}"))
    if error is None:
        took = (time.monotonic() - start) * 1000
        return OK, f"connected to {p.where}{via} in {took:.0f} ms", EX_OK
    if error.kind == "proxy":
        return ERROR, f"{error.text}: check \"{p.settings.proxy_key}\" in {CONF}", \
            EX_UNAVAILABLE
    if p.alt_open:
        return ERROR, (f"{error.text}; {p.host}:{alt} is open: set "
                       f"{p.settings.websocket_setting()} in {CONF} (MQTT over WebSocket on "
                       "443)"), EX_UNAVAILABLE
    return ERROR, (f"{error.text}{via}: a firewall, or the wrong port; IoT Hub takes MQTT on "
                   f"8883 and MQTT over WebSocket on 443"), EX_UNAVAILABLE


# OpenSSL verify codes (x509_vfy.h) and what a person calls them
_UNKNOWN_CA = {2, 18, 19, 20, 21}
_NAME_MISMATCH, _EXPIRED, _NOT_YET_VALID = 62, 10, 9


def _tls(p: _Path, limit: float):
    try:
        tls = hubpath.handshake(p.host, p.port, p.settings.proxy, p.link.ctx, limit,
                                p.addresses)
    except hubpath.PathError as err:
        return ERROR, str(err), EX_UNAVAILABLE
    except SetupError as err:
        return ERROR, str(err), EX_CONFIG
    except ssl.SSLCertVerificationError as err:
        return ERROR, _verify_failure(p, err), EX_UNAVAILABLE
    except ssl.SSLError as err:
        if (err.reason or "") in hubnet.CERT_ALERTS:  # the server was verified before it said this
            return OK, (f"{p.where}'s certificate verified against {p.trust()}; the hub then "
                        f"refused the client certificate ({hubnet.CERT_ALERTS[err.reason]}): see "
                        "hub-auth"), EX_OK
        return ERROR, f"{p.where}: TLS handshake failed: {hubpath.one_line(err)}", EX_UNAVAILABLE
    except (socket.timeout, TimeoutError):
        return ERROR, f"no answer to the TLS handshake from {p.where} within {limit:g} s", \
            EX_UNAVAILABLE
    except OSError as err:
        return ERROR, (f"{p.where} closed the connection during the TLS handshake "
                       f"({hubpath.one_line(err)}): not a TLS port, or a firewall"), EX_UNAVAILABLE
    with tls:
        cert, version = tls.getpeercert() or {}, tls.version()
    subject = _name(cert.get("subject")) or p.host
    issuer = _name(cert.get("issuer")) or "?"
    return OK, (f"{version} with {p.where}: certificate {subject}, issued by {issuer}, valid "
                f"until {cert.get('notAfter', '?')}, verified against {p.trust()}"), EX_OK


def _verify_failure(p: _Path, err: ssl.SSLCertVerificationError) -> str:
    code, why = err.verify_code, err.verify_message
    if code in _UNKNOWN_CA:
        fix = ("check that ca_file holds the CA that signed the hub's or gateway's certificate"
               if p.settings.ca_file else
               f"set \"ca_file\" in {CONF} to the CA of the gateway or private hub")
        return (f"the certificate of {p.where} is not trusted (unknown CA: {why}); the agent "
                f"trusts {p.trust()}: {fix} (a proxy or firewall inspecting TLS does this too)")
    if code == _NAME_MISMATCH:
        return (f"the certificate of {p.where} does not name {p.host} (name mismatch: {why}): "
                "check HostName, or GatewayHostName for a gateway")
    now = _iso(p.clock())
    if code in (_EXPIRED, _NOT_YET_VALID):
        state = "has expired" if code == _EXPIRED else "is not valid yet"
        return (f"the certificate of {p.where} {state} at the local time {now} ({why}): check "
                "the local clock (hub-clock), else the server's certificate is out of date")
    return f"the certificate of {p.where} does not verify: {why}"


def _clock(p: _Path, limit: float):
    port = p.port if p.settings.transport == "websocket" else p.https_port
    where = f"{p.host}:{port}"
    if port != p.port and p.alt_open is False:
        return SKIPPED, (f"no time source: {where} does not answer (the clock is compared with "
                         "the Date of the hub's HTTPS answer)"), EX_OK
    try:
        before, date, after = hubpath.http_date(p.host, port, p.settings.proxy,
                                                p.link.ctx, limit, p.clock, p.addresses)
    except (hubpath.PathError, SetupError, OSError, ValueError) as err:
        return SKIPPED, f"no time source: {where}: {hubpath.one_line(err)}", EX_OK
    skew = (before + after) / 2 - date
    if abs(skew) <= CLOCK_WARNING:
        return OK, (f"the local clock is within {max(1, round(abs(skew) + (after - before)))} s "
                    f"of the hub's (HTTP Date from {where})"), EX_OK
    side = "ahead of" if skew > 0 else "behind"
    text = (f"the local clock is {_duration(abs(skew))} {side} the hub's (local "
            f"{_iso(after)}, hub {_iso(date)}, HTTP Date from {where})")
    if abs(skew) > CLOCK_ERROR:
        return ERROR, (f"{text}: SAS tokens and certificates are checked against the hub's "
                       "clock; turn on time synchronisation (timedatectl set-ntp true) or set "
                       "the time"), EX_CONFIG
    return WARNING, f"{text}: turn on time synchronisation (timedatectl set-ntp true)", EX_OK


def _auth(p: _Path, limit: float):
    state = p.service_state or {}
    mine = f"connected to {p.identity.name}"
    if state.get("active") and state.get("status_text") == mine:
        return OK, (f"not connecting a second time: the running agent reports '{mine}' (the "
                    "unit's status); IoT Hub allows one connection per identity and a second "
                    "one would disconnect the agent"), EX_OK
    what = "certificate" if p.method == "certificate" else "key"
    try:
        result = hubpath.attempt(p.identity, p.settings, limit, p.clock, p.link,
                                 p.addresses)
    except SetupError as err:
        return ERROR, str(err), EX_CONFIG
    if result.kind == "accepted":
        return OK, (f"the hub accepted {p.identity.client_id} with the stored {what} "
                    f"({result.answer}); disconnected at once"), EX_OK
    if result.kind == "rejected":
        cause = f": {result.cause}" if result.cause else ""
        return ERROR, f"the hub refused the stored {what} ({result.answer}){cause}", EX_DATAERR
    return ERROR, f"no answer from the hub: {result.text}", EX_UNAVAILABLE


# NETWORK_IDS' order: the order they run in and are shown
CHECKS = {"hub-dns": _dns, "hub-tcp": _tcp, "hub-tls": _tls, "hub-clock": _clock,
          "hub-auth": _auth}


def _name(rdns) -> str:
    # the peer's words: no escape sequence reaches a terminal
    return next((f"CN={printable(value)}" for rdn in rdns or () for key, value in rdn
                 if key == "commonName"), "")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
