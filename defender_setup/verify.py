"""``defender-setup restart``: restart the agent once, prove it healthy, roll back if not.

Interface::

    settle(root: Path, *, timeout: float, strict: bool, out, restart=True, service=None,
           clock=time.monotonic, sleep=time.sleep, boot=False)
        -> Result(code, outcome, message, verdict)

The one verification policy of the provisioning core (:mod:`defender_setup.provision`): the
command line, the debconf trigger and the boot-time import all end here.

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
4. On failure: the unit's last journal lines of the failed invocation, then
   ``AgentDir.rollback()``, restart and verify again, and report loudly; with no previous set
   and the hub refusing the identity (the agent's exit 76), ``AgentDir.unconfigure()`` instead
   (the device is unconfigured, as before, and the refused set is kept as the previous one);
   any other failure with no previous set (a broken conf.json) keeps the credentials.
   Before that, when the hub refused the identity (76) and the set came from DPS with the
   device key kept, :func:`defender_setup.zerotouch.reprovision` registers again and
   re-creates the module (the device was re-assigned, or its module deleted): once per call,
   and once per boot with ``boot`` (a marker under /run); a new set that is healthy ends it.
   Returns 0 after a successful roll-back (so ``dpkg-reconfigure`` stays usable), 69 with
   ``strict``, when unconfigured again, or when the roll-back fails too. ``restart=False``
   watches a start already queued (the boot-time import, ordered before the agent) instead
   of restarting.
5. Microsoft's agent (:mod:`defender_setup.target`): the same verdict; its settings cache is
   deleted first when ``conf.json`` changed (:mod:`defender_setup.msagent`), and the healthy
   line says the hub's answer is the pre-flight probe's (this agent reports no status text).

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
from dataclasses import dataclass
from pathlib import Path

from . import facts
from .agentdir import AgentDir
from .errors import EX_OK, EX_REJECTED, EX_UNAVAILABLE, ServiceError, SetupError
from .msagent import forget_stale_cache
from .service import Service, UnitState

STABILITY_WINDOW = 1.5  # seconds; see the module docstring
POLL_INTERVAL = 0.1  # systemctl show costs ~5 ms; 10 polls/s keeps the verdict prompt
JOURNAL_LINES = 15


class Verdict:
    """Outcome of one restart: ``ok``, the last state seen and a one-line reason."""

    def __init__(self, ok: bool, state: UnitState, reason: str, stable_for: float = 0.0):
        self.ok, self.state, self.reason, self.stable_for = ok, state, reason, stable_for


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


def _healthy_line(unit: str, verdict: Verdict, target=None) -> str:
    line = f"{unit}: {verdict.state.describe()}, stable for {verdict.stable_for:.1f} s"
    if verdict.state.status_text:
        line += f", status: {verdict.state.status_text}"
    elif target is not None and target.microsoft:
        # Same criterion (active, same process for the window); the hub's word comes from
        # the pre-flight probe, since this agent reports no status text.
        line += (f" ({target.describe()} reports no hub status; the pre-flight probe "
                 "is the hub's answer)")
    return line


def _print_failure(svc: Service, verdict: Verdict, what: str, out) -> None:
    """``VERIFICATION FAILED: what``, then the failed invocation's last journal lines."""
    print(f"VERIFICATION FAILED: {what}", file=out)
    if not verdict.state.invocation_id:
        return
    lines = svc.journal_lines(verdict.state.invocation_id, JOURNAL_LINES)
    print(f"last journal lines of {svc.unit} (invocation {verdict.state.invocation_id}):",
          file=out)
    for line in lines or ["(none)"]:
        print(f"  {line}", file=out)


@dataclass(frozen=True)
class Result:
    """How :func:`settle` ended: the exit code, the outcome and one line saying why."""

    code: int
    outcome: str   # HEALTHY, ROLLED_BACK, UNCONFIGURED, FAILED, SKIPPED
    message: str = ""
    verdict: Verdict | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == HEALTHY


HEALTHY, ROLLED_BACK, UNCONFIGURED, FAILED, SKIPPED = (
    "healthy", "rolled back", "unconfigured", "failed", "skipped")


def refused(state: UnitState) -> bool:
    """The unit stopped because the hub refused the identity (the agent's exit 76)."""
    return state.active_state == "failed" and state.exec_main_status == EX_REJECTED


def settle(root: Path, *, timeout: float, strict: bool, out, restart: bool = True,
           service=None, clock=time.monotonic, sleep=time.sleep, boot: bool = False) -> Result:
    """The one verification policy (see the module docstring): restart once (or, with
    ``restart`` False, watch the start already under way), judge, and on failure go back to
    the previous set, or to unconfigured when there is none.

    ``code``: 0 when healthy, skipped or rolled back to a healthy set; 69 (EX_UNAVAILABLE)
    when unconfigured again, when the roll-back fails too, or with ``strict`` after any
    failure. The outcome is recorded in the public facts (:mod:`.facts`) as the last
    verification and the result of the change it judged (taken before a roll-back records
    a change of its own).
    """
    change = facts.pending_change(root)
    result = _settle(root, timeout=timeout, strict=strict, out=out, restart=restart,
                     service=service, clock=clock, sleep=sleep, boot=boot)
    facts.settled(root, result.outcome, change)
    return result


def _settle(root: Path, *, timeout: float, strict: bool, out, restart: bool, service, clock,
            sleep, boot: bool) -> Result:
    root = Path(root)
    agent = AgentDir(root)
    svc = service or Service(root)
    unit = svc.unit
    reason = svc.skip_reason()
    if reason:
        print(f"restart skipped: {reason}; the unit is enabled and will start on first boot",
              file=out)
        return Result(EX_OK, SKIPPED, reason)
    if agent.method() is None:  # a connection string, plain or sealed
        print(f"{unit}: not configured (no credentials in {agent.path}); "
              "configure it with 'dpkg-reconfigure defender-setup'", file=out)
        return Result(EX_OK, SKIPPED, "not configured")
    loaded = svc.show().load_state
    if loaded == "masked":
        print(f"restart skipped: {unit} is masked (systemctl unmask {unit} to use it)", file=out)
        return Result(EX_OK, SKIPPED, "masked")
    if loaded == "not-found":
        print(f"{unit}: not installed (systemd does not know the unit); reinstall "
              "defender-setup", file=out)
        return Result(EX_UNAVAILABLE, FAILED, "the unit is not installed")

    if restart:  # watching a start under way: too late for the cache, the next restart sees it
        forget_stale_cache(agent, out)
    started = clock()
    verdict = (restart_once if restart else watch)(svc, timeout, clock=clock, sleep=sleep)
    if verdict.ok:
        print(_healthy_line(unit, verdict, agent.target), file=out)
        return Result(EX_OK, HEALTHY, verdict.state.status_text or "active and stable", verdict)
    if verdict.state.condition_result == "no":
        print(f"{unit}: not configured (start condition not met); configure it with "
              "'dpkg-reconfigure defender-setup'", file=out)
        return Result(EX_OK, SKIPPED, "not configured", verdict)

    _print_failure(svc, verdict, f"{unit} {verdict.reason} ({clock() - started:.1f} s after "
                   "the restart)", out)
    refused = f"the agent refused the new credentials: {verdict.reason}"
    advice = "fix the new credentials and run 'dpkg-reconfigure defender-setup' again"
    def no_rollback(why: str) -> Result:
        print(f"VERIFICATION FAILED and no roll-back possible: {why}; {unit} is not healthy",
              file=out)
        return Result(EX_UNAVAILABLE, FAILED, f"{refused}; no roll-back possible: {why}",
                      verdict)

    if verdict.state.exec_main_status == EX_REJECTED:
        from .zerotouch import reprovision

        if reprovision(root, out, boot=boot):
            again = restart_once(svc, timeout, clock=clock, sleep=sleep)
            if again.ok:
                print(_healthy_line(unit, again), file=out)
                return Result(EX_OK, HEALTHY, "re-provisioned through DPS: the new module "
                              "identity is active and stable", again)
            _print_failure(svc, again, f"the re-provisioned identity fails too: {unit} "
                           f"{again.reason}", out)
            verdict = again
    if not agent.has_previous():
        if verdict.state.exec_main_status != EX_REJECTED:
            # Not the hub refusing the identity (a broken conf.json, say): the credentials
            # are not what is wrong, so they stay; the report says what failed.
            return no_rollback("there is no previous set")
        try:
            agent.unconfigure()
        except SetupError as exc:
            return no_rollback(str(exc))
        svc.reset_failed()  # unconfigured again: quiet, as before
        message = (f"{refused}; removed them again: the device is unconfigured, as before "
                   "(they are kept as the previous set: 'defender-setup rollback')")
        print(f"VERIFICATION FAILED and no previous credentials to roll back to: {message}; "
              f"{advice}", file=out)
        return Result(EX_UNAVAILABLE, UNCONFIGURED, message, verdict)
    try:
        agent.rollback()
    except SetupError as exc:
        return no_rollback(str(exc))
    print("rolled back to the previous credentials; restarting", file=out)
    again = restart_once(svc, timeout, clock=clock, sleep=sleep)
    if not again.ok:
        _print_failure(svc, again, f"the previous credentials fail too: {unit} {again.reason}",
                       out)
        return Result(EX_UNAVAILABLE, FAILED, f"{refused}; rolled back to the previous "
                      f"credentials, which fail too: {again.reason}", again)
    print(_healthy_line(unit, again, agent.target), file=out)
    print(f"VERIFICATION FAILED for the new credentials: rolled back to the previous "
          f"credentials, service healthy; {advice}"
          f"{' (strict mode: exit 69)' if strict else ''}", file=out)
    return Result(EX_UNAVAILABLE if strict else EX_OK, ROLLED_BACK,
                  f"{refused}; rolled back to the previous credentials, service healthy",
                  again)
