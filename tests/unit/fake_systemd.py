"""A fake ``systemctl`` for unit tests, put first on PATH (unattended-upgrades style).

The fake is a small script driven by a JSON "scenario" file: a list of unit states that
``systemctl show`` walks through (one per call, the last one sticks), and the exit status of
``systemctl restart``. Each call is appended to ``calls.log`` so tests can count restarts.
Scenario keys: ``states`` (list of dicts of systemctl properties), ``restart_rc``,
``after_restart`` (index of ``states`` to jump to when restart is called).
"""

import json
import os
from pathlib import Path

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
