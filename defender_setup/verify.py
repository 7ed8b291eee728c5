"""``defender-setup restart``: restart the agent once, prove it healthy, roll back if not.

Interface::

    restart_and_verify(root: Path, *, timeout: float, strict: bool, out, service=None,
                       clock=time.monotonic, sleep=time.sleep) -> int exit code

1. No running systemd (``DPKG_ROOT``, no ``/run/systemd/system`` under root, policy-rc.d
   exit 101) or another system's tree (a ``root`` other than ``/``): print ``restart
   skipped: …`` and return 0; the unit is enabled for first boot.
2. No credentials: "not configured", return 0 (the unit's ``ConditionPathExists=`` keeps it
   stopped; nothing to verify). A masked unit is left alone (0); an unknown one is 69, with
   no roll-back (the credentials are not what is wrong).
3. ``reset-failed`` (a deliberate restart must not trip the start limit), snapshot, restart
   ONCE (for ``Type=notify`` systemctl returns after ``READY=1``), then poll ``systemctl
   show`` until the unit has been ``active (running)`` with the same ``InvocationID`` and
   ``MainPID`` and an unchanged ``NRestarts`` for :data:`STABILITY_WINDOW`, bounded by
   ``timeout``.
4. On failure: the unit's last journal lines of the failed invocation, ``AgentDir.rollback()``,
   restart and verify again, report loudly. Returns 0 after a successful roll-back (so
   ``dpkg-reconfigure`` stays usable), 69 with ``strict`` or when the roll-back is impossible
   or fails too.

Why a 1.5 s window: READY=1 already means the runtime validated the files and its connector
had a first outcome, so what the window must still catch is an agent that dies right after
READY (a rejection arriving on a live connection, a crash in the first loop). Those show up
within a second; a crash loop shows as a new MainPID/NRestarts the moment the process exits
(SubState leaves ``running`` at once, whatever ``RestartSec`` is). 1.5 s keeps the healthy
verdict well inside 3 s of the restart and a failure plus roll-back near 4 s, where the
manual rule (watch the uptime for two minutes) takes 120 s.
The command line calls this inside the writers' lock (``AgentDir.lock``), held from the
write to the end of the roll-back, so no other command changes the set under a verification.
Output never contains secrets: it shows states, the status text and journal lines, all of
which come from the runtime, which never logs one.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import EX_OK, EX_UNAVAILABLE, ServiceError, SetupError
from .service import Service, UnitState

STABILITY_WINDOW = 1.5  # seconds; see the module docstring
POLL_INTERVAL = 0.1  # systemctl show costs ~5 ms; 10 polls/s keeps the verdict prompt
JOURNAL_LINES = 15


class Verdict:
    """Outcome of one restart: ``ok``, the last state seen and a one-line reason."""

    def __init__(self, ok: bool, state: UnitState, reason: str, stable_for: float = 0.0):
        self.ok, self.state, self.reason, self.stable_for = ok, state, reason, stable_for


def _configured(root: Path) -> bool:
    from .agentdir import AgentDir

    return AgentDir(root).method() is not None  # a connection string, plain or sealed


def restart_once(svc: Service, timeout: float, *, clock=time.monotonic, sleep=time.sleep):
    """Restart the unit exactly once and watch it for the stability window."""
    deadline = clock() + timeout
    svc.reset_failed()
    before = svc.show()
    try:
        svc.restart(timeout=max(1.0, deadline - clock()))
        restart_error = None
    except ServiceError as exc:
        restart_error = exc
    state = svc.show()
    if state.condition_result == "no":
        return Verdict(False, state, "not configured (start condition not met)")
    if restart_error is not None or not state.running:
        return Verdict(False, state, f"did not start: {state.describe()}")
    if before.invocation_id and state.invocation_id == before.invocation_id:
        return Verdict(False, state, "systemd did not restart it (same InvocationID)")
    return _stable(svc, state, deadline, timeout, clock=clock, sleep=sleep)


def watch(svc: Service, timeout: float, *, clock=time.monotonic, sleep=time.sleep) -> Verdict:
    """Verify the unit as it runs now, without restarting it: for a check ordered after the
    unit's own start job (the boot-time import), where a restart would be a second start."""
    deadline = clock() + timeout
    state = svc.show()
    while state.active_state in ("activating", "reloading") and clock() < deadline:
        sleep(POLL_INTERVAL)
        state = svc.show()
    if not state.running:
        return Verdict(False, state, f"is not running: {state.describe()}")
    return _stable(svc, state, deadline, timeout, clock=clock, sleep=sleep)


def _stable(svc: Service, first: UnitState, deadline: float, timeout: float, *, clock,
            sleep) -> Verdict:
    """Poll until ``first`` has lasted :data:`STABILITY_WINDOW` unchanged, or it did not."""
    state = first
    since = clock()
    while True:
        stable = clock() - since
        if stable >= STABILITY_WINDOW:
            return Verdict(True, state, "", stable)
        if clock() >= deadline:
            return Verdict(False, state, f"not stable within the {timeout:g} s timeout")
        sleep(POLL_INTERVAL)
        state = svc.show()
        if not state.running:
            return Verdict(False, state, f"stopped after {stable:.1f} s: {state.describe()}")
        if (state.invocation_id, state.main_pid) != (first.invocation_id, first.main_pid):
            return Verdict(False, state, f"restarted by systemd after {stable:.1f} s "
                           f"(main PID {first.main_pid} -> {state.main_pid})")
        if state.n_restarts != first.n_restarts:
            return Verdict(False, state, f"restarted by systemd after {stable:.1f} s "
                           f"(NRestarts {first.n_restarts} -> {state.n_restarts})")


def _healthy_line(unit: str, verdict: Verdict) -> str:
    line = f"{unit}: {verdict.state.describe()}, stable for {verdict.stable_for:.1f} s"
    if verdict.state.status_text:
        line += f", status: {verdict.state.status_text}"
    return line


def _print_journal(svc: Service, verdict: Verdict, out) -> None:
    if not verdict.state.invocation_id:
        return
    lines = svc.journal_lines(verdict.state.invocation_id, JOURNAL_LINES)
    print(f"last journal lines of {svc.unit} (invocation {verdict.state.invocation_id}):",
          file=out)
    for line in lines or ["(none)"]:
        print(f"  {line}", file=out)


def restart_and_verify(root: Path, *, timeout: float, strict: bool, out, service=None,
                       clock=time.monotonic, sleep=time.sleep) -> int:
    """Restart once, verify, roll back on failure; see the module docstring. Returns the
    exit code (0, or 69 = EX_UNAVAILABLE)."""
    from .agentdir import AgentDir

    root = Path(root)
    svc = service or Service(root)
    unit = svc.unit
    reason = svc.skip_reason()
    if reason:
        print(f"restart skipped: {reason}; the unit is enabled and will start on first boot",
              file=out)
        return EX_OK
    if not _configured(root):
        print(f"{unit}: not configured (no credentials in {AgentDir(root).path}); "
              "configure it with 'dpkg-reconfigure defender-setup'", file=out)
        return EX_OK

    loaded = svc.show().load_state
    if loaded == "masked":
        print(f"restart skipped: {unit} is masked (systemctl unmask {unit} to use it)", file=out)
        return EX_OK
    if loaded == "not-found":
        print(f"{unit}: not installed (systemd does not know the unit); reinstall "
              "defender-setup", file=out)
        return EX_UNAVAILABLE

    started = clock()
    verdict = restart_once(svc, timeout, clock=clock, sleep=sleep)
    if verdict.ok:
        print(_healthy_line(unit, verdict), file=out)
        return EX_OK
    if verdict.state.condition_result == "no":
        print(f"{unit}: not configured (start condition not met); configure it with "
              "'dpkg-reconfigure defender-setup'", file=out)
        return EX_OK

    print(f"VERIFICATION FAILED: {unit} {verdict.reason} "
          f"({clock() - started:.1f} s after the restart)", file=out)
    _print_journal(svc, verdict, out)
    try:
        AgentDir(root).rollback()
    except SetupError as exc:
        print(f"VERIFICATION FAILED and no roll-back possible: {exc}; {unit} is not healthy",
              file=out)
        return EX_UNAVAILABLE
    print("rolled back to the previous credentials; restarting", file=out)
    again = restart_once(svc, timeout, clock=clock, sleep=sleep)
    if not again.ok:
        print(f"VERIFICATION FAILED: the previous credentials fail too: {unit} "
              f"{again.reason}", file=out)
        _print_journal(svc, again, out)
        return EX_UNAVAILABLE
    print(_healthy_line(unit, again), file=out)
    print(f"VERIFICATION FAILED for the new credentials: rolled back to the previous "
          f"credentials, service healthy; fix the new credentials and run "
          f"'dpkg-reconfigure defender-setup' again{' (strict mode: exit 69)' if strict else ''}",
          file=out)
    return EX_UNAVAILABLE if strict else EX_OK
