"""The module twin's reported properties: what the agent tells IoT Hub about its set.

Interface (used by :mod:`defender_setup.agent.hub`, on the hub connection's thread)::

    report = Report(creds, root)          # the static facts, gathered once (at the 1st body)
    report.body() -> bytes                # the PATCH body now: {"defenderSetup": {...}}
    twin = Twin(report.body, interval=60, log=notify.log, clock=time.monotonic)
    twin.connected()                      # a new connection: report again, old answers void
    twin.due() -> (topic, body) | None    # a PATCH to publish now (QoS 0), if any
    twin.answer(topic)                    # a message on $iothub/twin/res/#
    RESPONSES, MAX_BODY

IoT Hub's MQTT convention: subscribe to ``$iothub/twin/res/#``, publish the patch to
``$iothub/twin/PATCH/properties/reported/?$rid={n}``; the hub answers on
``$iothub/twin/res/{status}/?$rid={n}&$version={v}`` (204 on success; 400, 429, 5xx).

One namespaced key, ``defenderSetup``, every field always present (``null`` when it does not
apply): a reported PATCH is merged into the twin, so a field left out would keep an old value
(a certificate's expiry after a switch to SharedAccessKey). What goes in is enumerated words,
versions, times and a boolean, never free text from a file and never a secret; the body is
at most :data:`MAX_BODY` bytes (checked on every build; a larger one is not sent).

Bounded traffic: a PATCH on every new connection and when the body changes, at most one per
``interval`` seconds (changes in between are coalesced into the next one), one at a time. An
error answer or no answer within :data:`ANSWER_WITHIN` seconds is retried with a doubling
delay up to :data:`MAX_BACKOFF`. The twin is a report, not a duty: whatever the hub answers or
does not answer here never touches the connection, the status or the exit code.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from defender_setup import __version__, facts
from defender_setup.agent.verdicts import iso

KEY = "defenderSetup"
SCHEMA_VERSION = 1
RESPONSES = "$iothub/twin/res/#"
PATCH_TOPIC = "$iothub/twin/PATCH/properties/reported/?$rid={rid}"
MAX_BODY = 4096  # bytes; IoT Hub allows 32 KiB of reported properties for the whole twin
ANSWER_WITHIN = 30.0  # seconds; IoT Hub answers within a second or two
MAX_BACKOFF = 3600.0
CHECK_EVERY = 5.0  # seconds between looks at the facts file (a stat and a small read)
# The package the runtime belongs to, by dpkg's name (the agent package when it exists)
PACKAGES = (b"defender-setup-agent", b"defender-setup")
MAX_STATUS = 64 * 1024 * 1024  # /var/lib/dpkg/status: a few MB on a full system
_VERSION = re.compile(r"[A-Za-z0-9.+~:-]{1,64}")
_RESPONSE = re.compile(r"\$iothub/twin/res/(\d{3})/\?(.*)")
_SHORT = 64  # characters kept of an os-release value
INFO, WARNING = 6, 4


def package_version(root: Path = Path("/")) -> str | None:
    """The version of the package that ships the runtime as dpkg knows it: its status file,
    then the journal of the dpkg run in progress (``updates/``: during an install the
    agent starts from the trigger, before dpkg folds the journal into ``status``), read line
    by line, never whole. None when not unpacked (tests, a source tree)."""
    dpkg = Path(root) / "var/lib/dpkg"
    found: dict = {}
    try:
        journal = sorted((p for p in (dpkg / "updates").iterdir() if p.name.isdigit()),
                         key=lambda p: int(p.name))
    except OSError:
        journal = []
    for path in [dpkg / "status", *journal[:1000]]:
        _paragraphs(path, found)
    for package in PACKAGES:
        value = found.get(package)
        if value and _VERSION.fullmatch(value):
            return value
    return None


# dpkg states in which the package's files (and so this version) are on disk
_UNPACKED = (b"unpacked", b"half-configured", b"triggers-awaited", b"triggers-pending",
             b"installed")


def _paragraphs(path: Path, found: dict) -> None:
    """Record (or clear) in ``found`` the version of each of :data:`PACKAGES` in ``path``."""
    fields: dict = {}

    def end():
        name = fields.get(b"Package")
        if name in PACKAGES:
            status = fields.get(b"Status", b"").split()
            unpacked = bool(status) and status[-1] in _UNPACKED
            version = fields.get(b"Version")
            found[name] = version.decode("ascii", "replace") if unpacked and version else None
        fields.clear()

    try:
        with open(path, "rb") as handle:
            read = 0
            for line in handle:
                read += len(line)
                if read > MAX_STATUS:
                    break
                if not line.strip():
                    end()
                elif line[:1] not in (b" ", b"\t"):
                    key, _, value = line.partition(b":")
                    if key in (b"Package", b"Status", b"Version"):
                        fields[key] = value.strip()
            end()
    except OSError:
        pass


def os_release(root: Path = Path("/")) -> dict:
    """ID, VERSION_ID and PRETTY_NAME of os-release (each None when absent), printable and
    short: the hub stores what it is given."""
    fields = {"ID": None, "VERSION_ID": None, "PRETTY_NAME": None}
    for name in ("etc/os-release", "usr/lib/os-release"):
        try:
            with open(Path(root) / name, "rb") as handle:
                text = handle.read(64 * 1024).decode("utf-8", "replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key in fields:
                value = "".join(c for c in value.strip().strip("\"'") if c.isprintable())
                fields[key] = value[:_SHORT] or None
        break
    return {"id": fields["ID"], "versionId": fields["VERSION_ID"],
            "prettyName": fields["PRETTY_NAME"]}


def sealed(creds) -> bool:
    """Whether systemd handed the secrets over from their sealed (``.cred``) files."""
    from defender_setup.credentials import SEALED_NAMES

    names = set(SEALED_NAMES.values())
    sources = getattr(creds, "sources", None) or {}
    return any(Path(source).name in names for source in sources.values())


class Report:
    """The ``defenderSetup`` object: the static part from the running set, gathered once; the
    facts file (origin, last change, last verification) read again at each :meth:`body`."""

    def __init__(self, creds, root: Path = Path("/")):
        self.root, self._creds = Path(root), creds
        self._static: dict | None = None

    def _gather(self) -> dict:
        """Once, on the hub connection's thread at its first PATCH: reading dpkg's status
        (7 ms for 800 KB here) stays off the way to READY=1."""
        creds = self._creds
        # a credentials.Validated; (tests hand the connector a bare hub.Identity instead)
        method = getattr(creds, "method", None)
        cert = creds.certificate if method == "certificate" else None
        return {
            "packageVersion": package_version(self.root),
            "agentVersion": __version__,
            "method": method,
            "certificate": {"notAfter": iso(cert.not_after.timestamp())} if cert else None,
            "sealed": sealed(creds),
            "osRelease": os_release(self.root),
        }

    def properties(self) -> dict:
        if self._static is None:
            self._static = self._gather()
        known = facts.read(self.root)
        return {"schemaVersion": SCHEMA_VERSION, **self._static, "origin": known.origin,
                "lastChange": known.last_change, "lastVerification": known.last_verification}

    def body(self) -> bytes:
        return encode(self.properties())


def encode(properties: dict) -> bytes:
    """The PATCH body; ValueError when it would exceed :data:`MAX_BODY` (never sent then)."""
    body = json.dumps({KEY: properties}, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_BODY:
        raise ValueError(f"the reported properties take {len(body)} bytes, over the "
                         f"{MAX_BODY}-byte bound")
    return body


class Twin:
    """When to PATCH, and what the answers mean; see the module docstring. Not thread-safe:
    the hub connection's thread is its only user."""

    def __init__(self, build, interval: float = 60.0, *, log, clock=time.monotonic,
                 check_every: float = CHECK_EVERY):
        self._build, self.interval, self._log, self._clock = build, interval, log, clock
        self._check_every = min(check_every, interval)
        self._body: bytes | None = None
        self._checked = None
        self._acked: bytes | None = None   # the body the hub last answered 2xx to
        self._inflight = None              # (rid, body, sent at)
        self._fresh = False                # a connection that has not had its PATCH yet
        self._not_before = 0.0             # the rate limit
        self._failures = 0
        self._rid = 0
        self._said = None                  # the last failure logged (one line per reason)
        self.sent = self.acked = 0         # counts (tests, bench)

    def connected(self) -> None:
        self._fresh = True
        self._inflight = None  # an answer to a PATCH of the old connection will not come

    def _current(self, now: float) -> bytes | None:
        if self._checked is None or now - self._checked >= self._check_every:
            self._checked = now
            try:
                self._body = self._build()
            except ValueError as err:  # over MAX_BODY: said once, nothing sent
                self._say(str(err))
                self._body = None
        return self._body

    def due(self):
        """``(topic, body)`` of a PATCH to publish now, or None."""
        now = self._clock()
        body = self._current(now)
        if self._inflight is not None:
            if now - self._inflight[2] < ANSWER_WITHIN:
                return None
            self._failed(now, f"no answer within {ANSWER_WITHIN:g} s")
        if body is None or now < self._not_before:
            return None
        if not self._fresh and body == self._acked:
            return None
        self._rid += 1
        rid = str(self._rid)
        self._inflight = (rid, body, now)
        self._fresh = False
        self._not_before = now + self.interval
        self.sent += 1
        return PATCH_TOPIC.format(rid=rid), body

    def answer(self, topic: str) -> None:
        """A message on ``$iothub/twin/res/#``: the answer to our PATCH, or ignored."""
        match = _RESPONSE.fullmatch(topic)
        if match is None or self._inflight is None:
            return
        query = dict(part.partition("=")[::2] for part in match.group(2).split("&"))
        if query.get("$rid") != self._inflight[0]:
            return
        status = int(match.group(1))
        if 200 <= status < 300:
            rid, body, _ = self._inflight
            self._inflight, self._acked, self._failures = None, body, 0
            self.acked += 1
            if self._said is not None or self.acked == 1:
                self._log(f"twin: reported properties updated ({len(body)} bytes)", INFO)
            self._said = None
            return
        self._failed(self._clock(), f"the hub answered {status}")

    def _failed(self, now: float, reason: str) -> None:
        sent_at = self._inflight[2] if self._inflight else now
        self._inflight = None
        self._failures += 1
        delay = min(MAX_BACKOFF, self.interval * 2 ** min(self._failures, 20))
        self._not_before = max(self._not_before, sent_at + delay)
        self._say(f"{reason} to the reported properties; trying again in {delay:g} s "
                  "(the connection is not affected)")

    def _say(self, reason: str) -> None:
        if reason.split(";")[0] != (self._said or "").split(";")[0]:
            self._log(f"twin: {reason}", WARNING)
        self._said = reason
