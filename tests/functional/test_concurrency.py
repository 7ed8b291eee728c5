"""Several writers, readers and an agent at once, real processes, for a bounded time.

Writers (``apply`` of a connection string, ``apply`` of a certificate, ``rollback``,
``restart``) and readers (``status --json``, ``check --json``) run the real command line in
loops against one throw-away root, beside the agent's reading as it really happens: each file
copied on its own without the lock, as PID 1 does at every start, then validated by the
agent's own code (fake_agent.py). The claims:

* every command that succeeded left a complete, valid set of one method: every state a reader
  sees under the shared lock (every ``status`` and ``check``) is one, and only successful
  writers make states;
* the agent, which reads without the lock, either gets one whole set or refuses what it got
  with its own validation: it never accepts a mixed identity;
* writers are serialised: none fails but with 75 (busy), and none did here within the wait;
* readers never change anything: they run in a private mount namespace where the root is
  read-only (as root; a write would fail and show), and a readers-only phase leaves every
  inode, mode, size and time of the tree as it was.

Root is needed for the read-only mount; the readers-only phase runs either way.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests import certfactory

pytestmark = pytest.mark.allow_subprocess("python3", "unshare")

REPO = Path(__file__).resolve().parents[2]
# Run until TARGET_OPERATIONS commands ran (about 20 s on 2 idle cores) or MIXED_SECONDS
# passed, whichever comes first; on a loaded host carry on past MIXED_SECONDS until FLOOR
# commands ran, never beyond HARD_SECONDS.
MIXED_SECONDS = float(os.environ.get("CONCURRENCY_SECONDS", "25"))
HARD_SECONDS = 4 * MIXED_SECONDS
TARGET_OPERATIONS = 400
FLOOR = 60
READERS_ONLY_SECONDS = 3.0
HUB, MODULE = "hub1.azure-devices.net", "DefenderIotMicroAgent"
ENV = dict(os.environ, PYTHONPATH=str(REPO))
CLI = ["/usr/bin/python3", "-m", "defender_setup"]


def read_only(root: Path, argv: list[str]) -> list[str]:
    """``argv`` in a private mount namespace where ``root`` is mounted read-only."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return argv
    return ["unshare", "--mount", "sh", "-ec", 'mount --bind -o ro "$1" "$1"; shift; '
            'exec "$@"', "ro", str(root), *argv]


def tree(root: Path) -> dict:
    seen = {}
    for base, dirs, names in os.walk(root):
        for name in dirs + names:
            st = os.lstat(os.path.join(base, name))
            seen[os.path.relpath(os.path.join(base, name), root)] = (
                st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return seen


@pytest.fixture
def inputs(tmp_path):
    def sas(device, seed):
        key = base64.b64encode(bytes((seed + i) % 256 for i in range(32))).decode()
        path = tmp_path / f"{device}.txt"
        path.write_text(f"HostName={HUB};DeviceId={device};ModuleId={MODULE};"
                        f"SharedAccessKey={key}\n")
        return ["--connection-string-file", str(path)]

    ident = certfactory.make_identity(cn="dev-x509", key="p256")
    (tmp_path / "cert.pem").write_bytes(ident.cert_pem)
    (tmp_path / "key.pem").write_bytes(ident.key_pem)
    (tmp_path / "x509.txt").write_text(f"HostName={HUB};DeviceId=dev-x509;ModuleId={MODULE};"
                                       "x509=true\n")
    cert = ["--connection-string-file", str(tmp_path / "x509.txt"), "--certificate",
            str(tmp_path / "cert.pem"), "--private-key", str(tmp_path / "key.pem")]
    return {"sas-a": sas("dev-a", 1), "sas-b": sas("dev-b", 2), "cert": cert}


class Loop(threading.Thread):
    """Runs one command line after another until ``stop`` says so; keeps every outcome."""

    def __init__(self, name, argvs, stop):
        super().__init__(name=name, daemon=True)
        self.argvs, self.stop, self.results = argvs, stop, []

    def run(self):
        i = 0
        while not self.stop():
            argv = self.argvs[i % len(self.argvs)]
            i += 1
            r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
            self.results.append((argv, r.returncode, r.stdout, r.stderr))


class Budget:
    """When to stop: see TARGET_OPERATIONS, MIXED_SECONDS, FLOOR and HARD_SECONDS."""

    def __init__(self, loops=()):
        self.started, self.loops = time.monotonic(), list(loops)

    def __call__(self) -> bool:
        ran = sum(len(loop.results) for loop in self.loops)
        elapsed = time.monotonic() - self.started
        return (ran >= TARGET_OPERATIONS or (elapsed >= MIXED_SECONDS and ran >= FLOOR)
                or elapsed >= HARD_SECONDS)


def status_problem(out: str) -> str | None:
    report = json.loads(out)
    if report["interrupted_update"] or report["problem"] or report["method"] is None:
        return f"status saw: method {report['method']}, problem {report['problem']}"
    return None


def check_problem(code: int, out: str) -> str | None:
    failed = [c for c in json.loads(out)["checks"] if c["status"] == "error"]
    return f"check failed: {failed}" if failed or code else None


def test_writers_readers_and_the_agent_together(tmp_path, inputs):
    root = tmp_path / "root"
    base = [*CLI]
    for first in ("sas-a", "cert"):  # a previous set exists from the start: rollback can run
        r = subprocess.run([*base, "apply", "--no-restart", "--root", str(root),
                            *inputs[first]], env=ENV, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    def writer(*argvs):
        return [[*base, *argv, "--root", str(root)] for argv in argvs]

    budget = Budget()
    agent = subprocess.Popen([sys.executable, "-m", "tests.functional.fake_agent", str(root),
                              str(HARD_SECONDS)], env=ENV, stdout=subprocess.PIPE,
                             stdin=subprocess.PIPE, text=True)
    budget.loops = loops = [
        Loop("apply-sas", writer(["apply", "--no-restart", *inputs["sas-a"]],
                                 ["apply", "--no-restart", *inputs["sas-b"]]), budget),
        Loop("apply-cert", writer(["apply", "--no-restart", *inputs["cert"]]), budget),
        Loop("rollback", writer(["rollback", "--no-restart"], ["restart"]), budget),
        Loop("status", [read_only(root, [*base, "status", "--json", "--root", str(root)])],
             budget),
        # --offline: the files are what this is about (the test hub's name does not resolve)
        Loop("check", [read_only(root, [*base, "check", "--json", "--offline", "--root",
                                        str(root)])], budget),
    ]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join(HARD_SECONDS + 150)
    agent_report = json.loads(agent.communicate("stop\n", timeout=60)[0])

    problems, codes = [], Counter()
    for loop in loops:
        for _, code, out, err in loop.results:
            codes[(loop.name, code)] += 1
            if "Traceback" in err or code not in (0, 75):
                problems.append(f"{loop.name} exited {code}: {err.strip()}")
            elif code == 0 and loop.name == "status":
                problems.append(status_problem(out))
            elif code == 0 and loop.name == "check":
                problems.append(check_problem(code, out))
    problems = [p for p in problems if p]
    successes = {name: codes[(name, 0)] for name in
                 ("apply-sas", "apply-cert", "rollback", "status", "check")}
    print(f"{time.monotonic() - budget.started:.1f} s: {dict(codes)}; agent {agent_report}")
    assert not problems, problems[:10]
    assert agent_report["bad"] == [], agent_report
    assert min(successes.values()) >= 3, successes
    assert sum(successes.values()) >= FLOOR and agent_report["reads"] >= FLOOR, (successes,
                                                                              agent_report)

    # Readers only: nothing they do may change a single inode, mode, size or time.
    before = tree(root)
    until = time.monotonic() + READERS_ONLY_SECONDS
    readers = [Loop(f"reader-{i}", [[*base, *argv, "--root", str(root)]],
                    lambda: time.monotonic() >= until)
               for i, argv in enumerate((["status"], ["check", "--offline"],
                                         ["status", "--json"]))]
    for loop in readers:
        loop.start()
    for loop in readers:
        loop.join(READERS_ONLY_SECONDS + 60)
    assert all(code == 0 for loop in readers for _, code, _, _ in loop.results)
    assert sum(len(loop.results) for loop in readers) >= 6
    assert tree(root) == before
