"""A stand-in for the agent in the concurrency test: reads the stored set over and over, as a
reader does (``AgentDir.snapshot``, under the shared lock), and says whether every read was one
complete, valid set of one method.

``python3 -m tests.functional.fake_agent ROOT SECONDS`` reads until SECONDS passed or a line
arrives on standard input, then prints one JSON line:
``{"reads": N, "busy": N, "bad": [problem, ...]}``.
"""

from __future__ import annotations

import json
import select
import sys
import time

from defender_setup.agentdir import AgentDir
from defender_setup.credentials import (
    CERTIFICATE_FILE,
    CONNECTION_STRING_FILE,
    PRIVATE_KEY_FILE,
    method_of,
    validate,
)
from defender_setup.errors import BusyError, SetupError


def problem_of(files: dict, pending: bool) -> str | None:
    """Why ``files`` is not one complete, valid set of one method (None when it is)."""
    if pending:
        return "an update was pending outside a writer's lock"
    method = method_of(files)
    if method is None:
        return f"no connection string (files: {sorted(files)})"
    certs = {CERTIFICATE_FILE, PRIVATE_KEY_FILE} & set(files)
    x509 = b"x509=true" in files[CONNECTION_STRING_FILE]
    if certs and certs != {CERTIFICATE_FILE, PRIVATE_KEY_FILE}:
        return f"half a certificate set: {sorted(files)}"
    if x509 != bool(certs):
        return f"x509={x509} with files {sorted(files)}"
    try:
        validate(method, files[CONNECTION_STRING_FILE], files.get(CERTIFICATE_FILE),
                 files.get(PRIVATE_KEY_FILE))
    except SetupError as exc:
        return f"invalid {method} set: {exc}"
    return None


def main(root: str, seconds: float) -> dict:
    agent = AgentDir(root)
    reads = busy = 0
    bad: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
        try:
            seen = agent.snapshot(timeout=5)
            files, pending = seen.files, seen.pending
        except BusyError:
            busy += 1
            continue
        except SetupError as exc:
            bad.append(str(exc))
            continue
        reads += 1
        problem = problem_of(files, pending)
        if problem:
            bad.append(problem)
        time.sleep(0.01)  # a real agent reads at start and on reload; leave CPU to the others
    return {"reads": reads, "busy": busy, "bad": bad[:20]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], float(sys.argv[2]))))
