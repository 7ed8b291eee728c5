"""The test doubles, in one place.

Interface::

    FakeSystemd(tmp_path, states, restart_plan)   # a fake systemctl first on PATH
    plant_policy_rc_d(root) -> Path               # a policy-rc.d leaving a mark when run
        .path_env(monkeypatch); .calls(); .restarts()
    running(...) / failed(...) -> dict            # unit states for its scenario
    FakeJournal(entries=None)                     # stands in for systemd.journal.Reader
    FakeClock()                                   # clock() and sleep() without waiting
    Notify()                                      # a connector's Notifier, recorded
    Recorder()                                    # the runtime's sd_notify and log, recorded
    handed_over(directory, **files) -> Path       # $CREDENTIALS_DIRECTORY as systemd makes it
    FakeCreds(tmp_path)                           # a fake systemd-creds first on PATH
        .path_env(monkeypatch); .machine(key); .kind(HOST | HOST_AND_TPM2); .calls()

The fake ``systemctl`` (unattended-upgrades style: a real executable first on PATH, so the
wrapper's subprocess handling is exercised) is a small script driven by a JSON "scenario"
file: a list of unit states that ``systemctl show`` walks through (one per call, the last one
sticks), and per restart a step of ``restart_plan`` (``rc``, new ``states``). Each call is
appended to ``calls.log`` so tests can count restarts. Tests that use it allow
``systemctl``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from defender_setup.agent.credsdir import ABSENT
from tests.hubsim.broker import wait_until

SCRIPT = """#!/usr/bin/python3
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
path = os.path.join(here, "scenario.json")
scenario = json.load(open(path))
cmd = sys.argv[1]
if cmd == "show":
    i = min(scenario.get("pos", 0), len(scenario["states"]) - 1)
    for k, v in scenario["states"][i].items():
        print(f"{k}={v}")
    scenario["pos"] = i + 1
elif cmd == "restart":
    scenario["restarts"] = scenario.get("restarts", 0) + 1
    plan = scenario.get("restart_plan", [{}])
    step = plan[min(scenario["restarts"] - 1, len(plan) - 1)]
    scenario["states"] = step.get("states", scenario["states"])
    scenario["pos"] = 0
    rc = step.get("rc", 0)
    json.dump(scenario, open(path, "w"))
    if rc:
        print("Job for unit failed.", file=sys.stderr)
    sys.exit(rc)
json.dump(scenario, open(path, "w"))
"""


def running(inv="inv-1", pid=100, restarts=0, status="ready"):
    return {
        "InvocationID": inv, "MainPID": pid, "NRestarts": restarts, "ActiveState": "active",
        "SubState": "running", "StatusText": status, "ExecMainStatus": 0, "Result": "success",
        "ConditionResult": "yes",
    }


def failed(inv="inv-2", status=76):
    return {
        "InvocationID": inv, "MainPID": 0, "NRestarts": 0, "ActiveState": "failed",
        "SubState": "failed", "StatusText": "", "ExecMainStatus": status,
        "Result": "exit-code", "ConditionResult": "yes",
    }


class FakeSystemd:
    """A bin directory with the fake systemctl; ``env`` puts it first on PATH."""

    def __init__(self, tmp_path: Path, states, restart_plan):
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        exe = self.bin / "systemctl"
        exe.write_text(SCRIPT)
        exe.chmod(0o755)
        (self.bin / "scenario.json").write_text(
            json.dumps({"states": states, "restart_plan": restart_plan})
        )

    def calls(self):
        log = self.bin / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def restarts(self):
        return [c for c in self.calls() if c.startswith("restart")]

    def path_env(self, monkeypatch):
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")


class FakeJournal:
    """Stands in for ``systemd.journal.Reader`` (python-systemd is exercised in the
    container tests); records the matches it was given and whether it was closed."""

    DEFAULT = ({"SYSLOG_IDENTIFIER": "defender-iot-micro-agent", "_PID": 42,
                "MESSAGE": "hub rejected the identity: not authorized"},)

    def __init__(self, entries=DEFAULT):
        self.entries, self.matches, self.closed = list(entries), [], False

    def add_match(self, **kw):
        self.matches.append(kw)

    def add_disjunction(self):
        self.matches.append("OR")

    def __iter__(self):
        return iter(self.entries)

    def close(self):
        self.closed = True


class FakeClock:
    """``clock()`` and ``sleep(seconds)`` for code that takes both: sleeping advances it."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Notify:
    """Records what a connector reports through the runtime's Notifier interface."""

    def __init__(self):
        self.statuses, self.lines, self.failed = [], [], None
        self.readied = False
        self.cond = threading.Condition()

    def ready(self):
        with self.cond:
            self.readied = True
            self.cond.notify_all()

    def status(self, text):
        with self.cond:
            self.statuses.append(text)
            self.cond.notify_all()

    def log(self, line, level=6):
        with self.cond:
            self.lines.append((level, line))
            self.cond.notify_all()

    def fail(self, code, line):
        with self.cond:
            self.failed = (code, line)
            self.cond.notify_all()

    def wait(self, predicate, timeout=15.0):
        return wait_until(self.cond, predicate, timeout)

    def everything(self):
        return "\n".join(self.statuses + [line for _, line in self.lines]
                         + ([self.failed[1]] if self.failed else []))


def plant_policy_rc_d(root):
    """An executable policy-rc.d in the tree that leaves a mark when it runs."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.parent.mkdir(parents=True)
    policy.write_text(f"#!/bin/sh\ntouch {root}/RAN\nexit 0\n")
    policy.chmod(0o755)
    return root / "RAN"


class Recorder:
    """The runtime's ``sd_notify`` and ``log`` callables, recording what they are given."""

    def __init__(self):
        self.notified, self.lines = [], []
        self.on_notify = None  # called with each notification (a test's next step)

    def notify(self, state):
        self.notified.append(state)
        if self.on_notify is not None:
            self.on_notify(state)

    def log(self, line, level):
        self.lines.append((level, line))


# -- systemd-creds ---------------------------------------------------------------------------
# It speaks the subset defender-setup uses (``encrypt --name=N --with-key=auto - -`` and
# ``decrypt --name=N - -``) and behaves like the real one where the tests look: base64 text
# starting with systemd's 16-byte header of the key kind, the content scrambled with the
# "machine key" (a file next to it: changing it is moving the set to another machine) and the
# name, and a wrong machine or name fails with "Decryption failed (incorrect key?)". Each
# call's argv goes to calls.log, so tests can prove no secret was on it. Not cryptography: a
# stand-in for the real tool, which the integration tests use. Tests allow "systemd-creds".
HOST = "5a1c6a86df9d4096b1d5a65e0862f19a"            # systemd's CRED_AES256_GCM_BY_HOST
HOST_AND_TPM2 = "93a894094874449090caf2fc93cab553"   # ..._BY_HOST_AND_TPM2_HMAC

CREDS_SCRIPT = r"""#!/usr/bin/python3
import base64, hashlib, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
verb, args = sys.argv[1], sys.argv[2:]
name = next(a.split("=", 1)[1] for a in args if a.startswith("--name="))
machine = open(os.path.join(here, "machine.key"), "rb").read()
kind = bytes.fromhex(open(os.path.join(here, "kind")).read().strip())
def stream(n):
    out, i = b"", 0
    while len(out) < n:
        out += hashlib.sha256(machine + name.encode() + i.to_bytes(4, "big")).digest()
        i += 1
    return out[:n]
tag = hashlib.sha256(b"tag" + machine + name.encode()).digest()[:8]
data = sys.stdin.buffer.read()
if verb == "encrypt":
    blob = kind + tag + bytes(a ^ b for a, b in zip(data, stream(len(data))))
    text = base64.b64encode(blob)
    sys.stdout.buffer.write(b"\n".join(text[i:i + 64] for i in range(0, len(text), 64)) + b"\n")
elif verb == "decrypt":
    blob = base64.b64decode(b"".join(data.split()))
    if blob[16:24] != tag:
        print("Credential secret file is not located on encrypted media, using anyway.",
              file=sys.stderr)
        print("Decryption failed (incorrect key?): error:00000000:lib(0)::reason(0)",
              file=sys.stderr)
        sys.exit(1)
    body = blob[24:]
    sys.stdout.buffer.write(bytes(a ^ b for a, b in zip(body, stream(len(body)))))
else:
    sys.exit(2)
"""


def debian12(root: Path) -> None:
    """Mark ``root`` as a tree with systemd-creds (systemd >= 250): sealing is possible there."""
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/systemd-creds").touch()


def seal_here(root, environ=None) -> None:
    """``sealing.store``'s ``defer``: seal a throw-away root as if it were the running system."""
    return None


def seal_set(root: Path, validated) -> None:
    """Store ``validated`` (a ``credentials.Validated``) sealed under ``root``, a Debian 12
    tree, with whatever ``systemd-creds`` is first on PATH (a :class:`FakeCreds`)."""
    from defender_setup import sealing
    from defender_setup.agentdir import AgentDir

    debian12(Path(root))
    sealing.store(AgentDir(root), validated.files, validated.method, True, defer=seal_here)


class FakeCreds:
    """A bin directory with the fake systemd-creds; ``path_env`` puts it first on PATH."""

    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "fakecreds"
        self.bin.mkdir()
        exe = self.bin / "systemd-creds"
        exe.write_text(CREDS_SCRIPT)
        exe.chmod(0o755)
        self.machine(b"machine one")
        self.kind(HOST)

    def machine(self, key: bytes) -> None:
        """Become another machine: what the old key sealed no longer decrypts."""
        (self.bin / "machine.key").write_bytes(key)

    def kind(self, header_hex: str) -> None:
        (self.bin / "kind").write_text(header_hex)

    def calls(self) -> list[str]:
        log = self.bin / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def path_env(self, monkeypatch) -> None:
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")


# What systemd hands the agent's unit (debian/*.service: LoadCredential= and SetCredential=).
IDS = ("connection_string.txt", "certificate_public.pem", "certificate_private.pem",
       "connection_string.txt.cred", "certificate_private.pem.cred", "conf.json")


def handed_over(directory: Path, **files: bytes) -> Path:
    """What systemd makes of the unit: ``files`` by ID (dots as in the names), else absent."""
    directory.mkdir()
    for name in IDS:
        (directory / name).write_bytes(files.get(name.replace(".", "_"), ABSENT))
    return directory
