"""The agent's side of the concurrency test, as it really is: PID 1 copies each file into the
service's credentials directory on its own, without the writers' lock (``LoadCredential=``,
at every start, a crash restart included), and the agent validates what it got
(``runtime.load_credentials``: the same code, reading the agent directory by name as systemd
hands it over). Over and over, while writers run: every copy must be one complete, valid set
of one method, or be refused by the agent's own validation (a copy taken in the middle of a
switch: the agent exits 78 and is restarted); never a mixed identity accepted.

``python3 -m tests.functional.fake_agent ROOT SECONDS`` reads until SECONDS passed or a line
arrives on standard input, then prints one JSON line:
``{"reads": N, "refused": N, "bad": [problem, ...]}``.
"""

from __future__ import annotations

import json
import select
import sys
import time

from defender_setup.credentials import (
    CERTIFICATE_FILE,
    CONNECTION_STRING_FILE,
    PRIVATE_KEY_FILE,
    method_of,
    validate,
)
from defender_setup.errors import SetupError


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
    from pathlib import Path

    from defender_setup.agent.runtime import load_credentials

    reads = refused = 0
    bad: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
        try:
            creds = load_credentials(Path(root))
        except SetupError:
            refused += 1  # a copy taken mid-write, refused as the agent would (exit 78)
            continue
        reads += 1
        problem = problem_of({name: data for name, (data, _) in creds.files.items()}, False)
        if problem:
            bad.append(problem)
        time.sleep(0.01)  # a real agent reads at start and on reload; leave CPU to the others
    return {"reads": reads, "refused": refused, "bad": bad[:20]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], float(sys.argv[2]))))
