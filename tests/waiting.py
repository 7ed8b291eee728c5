"""Waiting for an observable event in tests, never for a fixed time.

Interface::

    value = wait_for(predicate, timeout, what)   # predicate()'s first truthy value

``predicate`` is polled until it returns something truthy, which is returned; after
``timeout`` seconds an ``AssertionError`` says what did not happen (``what``) and, when given,
``why()`` (the state that explains it: statuses seen, a log). The deadline only bounds a test
that has already failed: it is generous, and a passing test never waits it out. The test hubs
(tests/hubsim) wait on their own condition variables (``hub.wait_for``); this is for events
that nothing notifies, such as a process's state in /proc or a unit's state in systemd.
"""

from __future__ import annotations

import time

POLL = 0.02  # seconds between two looks: short against what the tests wait for


def wait_for(predicate, timeout: float, what: str, why=None, poll: float = POLL):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" ({why()})" if why is not None else ""
            raise AssertionError(f"{what}: not within {timeout:g} s{detail}")
        time.sleep(poll)
