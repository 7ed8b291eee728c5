"""What ``apply`` does with a request, for every adapter that does the same: the command line's
``apply`` and ``provision`` (zero-touch, :mod:`defender_setup.zerotouch`).

Interface::

    with Writing(root, out, lock_timeout) as agent: ...   # the writers' lock + repair
    apply(root, request, *, out, restart=True, timeout=30.0, strict=False,
          lock_timeout=None, service=None, probe_asked=False, on_commit=None) -> exit code

``apply`` plans the request against the stored set (:mod:`defender_setup.provision`), prints
what it found (redacted), probes the hub when asked, takes the writers' lock, commits, and
restarts and verifies (:func:`defender_setup.verify.settle`) unless ``restart`` is false.
``held_back``: what to say when ``restart`` is false (who restarts instead), or "" for nothing.
``on_commit(agent, plan, lines)`` runs under the same lock right after the commit (also when
the set was unchanged): what an adapter keeps beside the set (zero-touch's registration).
"""

from __future__ import annotations

from contextlib import ExitStack

from . import provision
from .errors import EX_OK
from .probe import probe
from .sealing import require


class Writing:
    """``with Writing(root, out, lock_timeout) as agent``: the writers' lock around a whole
    command (write, restart, verify, roll-back), and the completion of an update left half
    done before. ``prefix`` starts the line that says so (``defender-setup import: ``)."""

    def __init__(self, root, out, lock_timeout: float | None = None, prefix: str = ""):
        from .agentdir import WRITE_WAIT, AgentDir

        self.agent, self.out, self.prefix = AgentDir(root), out, prefix
        self.timeout = WRITE_WAIT if lock_timeout is None else lock_timeout

    def __enter__(self):
        with ExitStack() as stack:  # the lock is released if the repair fails
            stack.enter_context(self.agent.lock(self.timeout))
            if self.agent.repair():
                print(f"{self.prefix}repaired: an interrupted credential update was "
                      "completed", file=self.out)
            self._held = stack.pop_all()
        return self.agent

    def __exit__(self, *exc):
        return self._held.__exit__(*exc)


def print_found(validated, out) -> None:
    print("found:", file=out)
    for line in validated.summary_lines():
        print(f"  {line}", file=out)
    for warning in validated.warnings:
        print(f"warning: {warning}", file=out)


def print_stored(lines: list[str], out, kept: bool = True) -> None:
    """``kept``: there is a previous set to roll back to (not after a first configuration)."""
    note = " (previous set kept for 'defender-setup rollback')" if kept else ""
    print(f"{lines[0]}{note}", file=out)
    for line in lines[1:]:
        print(line, file=out)


def apply(root, request, *, out, restart: bool = True, timeout: float = 30.0,
          strict: bool = False, lock_timeout: float | None = None, service=None,
          probe_asked: bool = False, on_commit=None,
          held_back: str = "restart skipped (--no-restart)") -> int:
    """See the module docstring; the exit code."""
    writing = Writing(root, out, lock_timeout)
    p = provision.plan(request, provision.read(writing.agent, writing.timeout))
    print_found(p.validated, out)
    if p.probe:  # before the lock and before anything is written: a refusal changes nothing
        outcome = probe(p.validated, root)
        if outcome.error is not None:
            raise outcome.error  # reported once, as the error
        print(outcome.line, file=out)
    elif probe_asked:
        print("probe: not tried: these are the credentials stored now (a second connection "
              "as the running identity would knock the agent off the hub)", file=out)
    if p.seal and not p.unchanged:  # before the lock, which creates the agent directory
        require(root)
    with writing as agent:
        lines = provision.commit(agent, p)
        if on_commit is not None:
            on_commit(agent, p, lines)
        if not lines:
            ident = p.validated.connection_string
            print(f"unchanged: the {p.validated.method} credentials for {ident.device_id}/"
                  f"{ident.module_id} are stored already; nothing written, nothing restarted "
                  "(defender-setup restart restarts the service)", file=out)
            return EX_OK
        print_stored(lines, out, agent.has_previous())
        if not restart:
            if held_back:
                print(held_back, file=out)
            return EX_OK
        from .verify import settle

        return settle(root, timeout=timeout, strict=strict, out=out, service=service).code
