"""The pre-flight probe: does the hub accept NEW credentials? Asked before anything is written.

Interface::

    outcome = probe(validated, root=Path("/"), timeout=PROBE_TIMEOUT, clock=time.time)
    outcome.kind     # ACCEPTED, REFUSED, UNREACHABLE or SKIPPED
    outcome.line     # one line for a person ("probe: …"), never a secret
    outcome.error    # REFUSED: a ProbeRefused to raise (exit 65), naming the field to correct

``apply --probe`` and the debconf helper (question ``defender-setup/probe-hub``) call it with
a ``credentials.Validated`` that is not written yet: one authenticated CONNECT exactly as the
agent would make it (same settings from conf.json, same trust, same SAS token rules), and the
connection is closed before :func:`probe` returns. The hub refusing is the only outcome that
stops the caller; a hub that cannot be reached (an image build, an offline device, no DNS) is
reported in one line and the credentials are accepted untested, within ``timeout`` seconds.

A new certificate and key are handed to OpenSSL through anonymous memory files
(``memfd_create``), so even the probe's copy of the private key never touches a disk.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from .credentials import CERTIFICATE_FILE, PRIVATE_KEY_FILE
from .errors import CERTIFICATE, CONNECTION_STRING, SetupError, ValidationError

ACCEPTED, REFUSED, UNREACHABLE, SKIPPED = "accepted", "refused", "unreachable", "skipped"
# No network (image builds) fails at once; a silent network costs at most this, in all.
PROBE_TIMEOUT = 6.0


class ProbeRefused(ValidationError):
    """The hub refused the new credentials (exit 65); ``field`` names what to correct."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str
    line: str
    error: ProbeRefused | None = None


def probe(validated, root: Path = Path("/"), timeout: float = PROBE_TIMEOUT,
          clock=time.time) -> Outcome:
    """Try ``validated`` (not yet written) against the hub once; see the module docstring."""
    from . import hubpath
    from .agent import settings as settings_mod
    from .agent.hub import Identity

    try:
        settings = settings_mod.load(Path(root))
    except SetupError as err:
        return Outcome(SKIPPED, f"probe: not tried: {err}")
    identity = Identity.from_credentials(validated, Path(root))
    fds: list[int] = []
    try:
        if validated.method == "certificate":
            try:
                identity = _in_memory(identity, validated.files, fds)
            except OSError as err:
                return Outcome(SKIPPED, f"probe: not tried: cannot hand the certificate to "
                                        f"TLS in memory ({err.strerror})")
        result = hubpath.attempt(identity, settings, timeout, clock)
    except SetupError as err:
        return Outcome(SKIPPED, f"probe: not tried: {err}")
    finally:
        for fd in fds:
            os.close(fd)
    what = "certificate" if validated.method == "certificate" else "key"
    if result.kind == "accepted":
        return Outcome(ACCEPTED, f"probe: the hub accepted {identity.name} "
                                 f"({result.answer}); connection closed")
    if result.kind == "rejected":
        reason = f"the hub refused this {what} ({result.answer})"
        if result.cause:
            reason += f": {result.cause}"
        field = CERTIFICATE if what == "certificate" else CONNECTION_STRING
        return Outcome(REFUSED, f"probe: {reason}", ProbeRefused(field, reason))
    return Outcome(UNREACHABLE, f"probe: the hub could not be reached ({result.text}); "
                                f"the {what} is accepted without the hub's answer")


def _in_memory(identity, files: dict, fds: list):
    """The identity with its certificate and key in anonymous memory files (``/proc/self/fd``);
    each descriptor goes to ``fds`` as soon as it is open, for the caller to close."""
    from .safefs import memory_file

    paths = []
    for name in (CERTIFICATE_FILE, PRIVATE_KEY_FILE):
        fd, path = memory_file(name, files[name][0])
        fds.append(fd)
        paths.append(path)
    return dataclasses.replace(identity, cert_file=paths[0], key_file=paths[1])
