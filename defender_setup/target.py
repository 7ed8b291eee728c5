"""Which micro agent this system runs, and so where its credentials go: the one place that
decides.

Interface::

    t = detect(root=Path("/"))   # Target, from the dpkg database under root (never runs dpkg)
    t.package, t.version         # "defender-setup-agent" | "defender-iot-micro-agent", "4.1.2"
    t.microsoft                  # Microsoft's own agent package is installed
    t.agent_dir                  # "etc/defender_iot_micro_agent" or "var/defender_iot_micro_agent"
                                 # (relative to root)
    t.cache                      # Microsoft's settings cache to delete after a conf.json change
    t.describe()                 # "Microsoft's defender-iot-micro-agent 4.1.2" for status/check

Why the dpkg database and not the unit file: both agents install a unit of the same name
(``defender-iot-micro-agent.service``), and our runtime's package *provides* the name
``defender-iot-micro-agent`` but never is a package of that name: the status file lists a
``Package: defender-iot-micro-agent`` stanza only for Microsoft's package. Microsoft moved
the directory in 4.1.2 (``/etc/defender_iot_micro_agent``; earlier releases read
``/var/defender_iot_micro_agent``, as ours does). Reading the file (bounded) instead of running
``dpkg-query`` keeps ``--root`` trees and tests free of subprocesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import AGENT_DIR

MICROSOFT_PACKAGE = "defender-iot-micro-agent"
OUR_PACKAGE = "defender-setup-agent"
MICROSOFT_ETC_SINCE = "4.1.2"      # first release that reads /etc/defender_iot_micro_agent
MICROSOFT_ETC_DIR = "etc/defender_iot_micro_agent"  # relative to a root
MICROSOFT_CACHE = "var/lib/defender_iot_micro_agent/cache.json"  # relative to a root
DPKG_STATUS = "var/lib/dpkg/status"  # relative to a root
STATUS_LIMIT = 64 * 1024 * 1024    # a real status file is a few MB
_FIELD = re.compile(r"(?m)^(Package|Status|Version):(.*)$")  # the fields read, in a stanza
# dpkg states in which a package's files are on disk (not "not-installed", "config-files").
_UNPACKED = ("installed", "half-configured", "unpacked", "half-installed",
             "triggers-awaited", "triggers-pending")


@dataclass(frozen=True)
class Target:
    """The agent that credentials are written for."""

    package: str
    version: str | None = None

    @property
    def microsoft(self) -> bool:
        return self.package == MICROSOFT_PACKAGE

    @property
    def agent_dir(self) -> str:
        if self.microsoft and self.version and compare_versions(
                self.version, MICROSOFT_ETC_SINCE) >= 0:
            return MICROSOFT_ETC_DIR
        return AGENT_DIR

    @property
    def cache(self) -> str | None:
        return MICROSOFT_CACHE if self.microsoft else None

    def describe(self) -> str:
        version = f" {self.version}" if self.version else ""
        if self.microsoft:
            return f"Microsoft's {self.package}{version}"
        return f"{self.package}{version} (defender-setup's runtime)"


OURS = Target(OUR_PACKAGE)


def detect(root: Path | str = "/") -> Target:
    """The agent installed under ``root``: Microsoft's package when dpkg lists it with its
    files on disk, else ours (also when nothing is installed yet: an image being built)."""
    status = Path(root) / DPKG_STATUS
    try:
        with open(status, "rb") as handle:
            text = handle.read(STATUS_LIMIT).decode("utf-8", "replace")
    except OSError:
        return OURS
    ours = OURS
    for stanza in text.split("\n\n"):
        fields = {m.group(1): m.group(2).strip() for m in _FIELD.finditer(stanza)}
        state = fields.get("Status", "").split()
        if not state or state[-1] not in _UNPACKED:
            continue
        if fields.get("Package") == MICROSOFT_PACKAGE:
            return Target(MICROSOFT_PACKAGE, fields.get("Version"))
        if fields.get("Package") == OUR_PACKAGE:
            ours = Target(OUR_PACKAGE, fields.get("Version"))
    return ours


# -- Debian version comparison (deb-version(7)), so no python3-apt is needed -----------------
def _order(char: str) -> int:
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        lead_a, num_a, a = re.match(r"([^0-9]*)([0-9]*)(.*)", a, re.S).groups()
        lead_b, num_b, b = re.match(r"([^0-9]*)([0-9]*)(.*)", b, re.S).groups()
        # The end of the non-digits weighs 0: after "~", before any other character.
        key_a = [_order(c) for c in lead_a] + [0], int(num_a or 0)
        key_b = [_order(c) for c in lead_b] + [0], int(num_b or 0)
        if key_a != key_b:
            return -1 if key_a < key_b else 1
    return 0


def _split(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.partition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
    return int(epoch or 0) if epoch.isdigit() else 0, upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian orders versions ``a`` and ``b`` (``dpkg --compare-versions``)."""
    ea, ua, ra = _split(a.strip())
    eb, ub, rb = _split(b.strip())
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)
