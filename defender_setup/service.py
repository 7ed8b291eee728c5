"""The only code that talks to systemd: ``systemctl`` and the journal.

Interface::

    svc = Service(root=Path("/"), runner=None, journal=None, environ=None, manages_root=None)
    svc.unavailable_reason() -> str | None   # why systemd must not be asked here at all
    svc.skip_reason() -> str | None      # why no restart may happen here (+ policy-rc.d)
    svc.show() -> UnitState              # systemctl show -p InvocationID,MainPID,...
    svc.restart(timeout) / svc.queue_restart() / svc.reset_failed()
    svc.journal_lines(invocation_id, count=15) -> list[str]
    svc.state() -> dict | None           # for ``status`` / ``check``: {"active", "summary", ...}

Every systemctl call goes through :meth:`Service.systemctl` (one wrapper, module constants,
:class:`~defender_setup.errors.ServiceError` on failure), as landscape-client's
serviceconfig.py does. ``systemctl`` is looked up on ``PATH`` at call time, so tests put a
fake one first on ``PATH`` (unattended-upgrades style) or pass ``runner``; nothing here is
patched. The journal is read with python-systemd's ``systemd.journal.Reader`` (imported
lazily), filtered on the unit and one invocation; ``journal`` injects another reader factory.

Nothing is run from the tree under ``root``, and the host's systemd is asked only about the
host: a ``root`` other than ``/`` is another system (an image, a tree under inspection), so
its state is "not checked" and restarts are skipped. Only a restart (a writer, on the host)
consults ``usr/sbin/policy-rc.d``; ``status`` and ``check`` never execute it. Tests that let a
throw-away tree stand for the host pass ``manages_root=True``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from . import UNIT
from .errors import ServiceError, printable

SYSTEMCTL = "systemctl"
POLICY_RC_D = "usr/sbin/policy-rc.d"  # relative to root
SYSTEMD_RUNNING = "run/systemd/system"  # relative to root; sd_booted()'s test
POLICY_FORBIDDEN = 101  # policy-rc.d: action forbidden (mmdebstrap, piuparts, image builds)
# What UnitState holds: one property per field, in the order of its fields.
SHOW_PROPERTIES = ("InvocationID", "MainPID", "NRestarts", "ActiveState", "SubState",
                   "StatusText", "ExecMainStatus", "Result", "ConditionResult",
                   "UnitFileState", "LoadState")
# Environment for systemctl: no pager, no colours, no interactive password agent.
_QUIET_ENV = {"SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class UnitState:
    """The part of ``systemctl show`` verification looks at (all strings, as systemctl says)."""

    invocation_id: str = ""
    main_pid: int = 0
    n_restarts: int = 0
    active_state: str = ""
    sub_state: str = ""
    status_text: str = ""
    exec_main_status: int = 0
    result: str = ""
    condition_result: str = ""
    unit_file_state: str = ""
    load_state: str = ""

    @classmethod
    def parse(cls, text: str) -> UnitState:
        props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        values = {}
        for prop, item in zip(SHOW_PROPERTIES, fields(cls)):
            value = props.get(prop, "")
            if isinstance(item.default, int):  # a number: its default is 0
                try:
                    value = int(value or 0)
                except ValueError:  # "[not set]" on old systemd
                    value = 0
            values[item.name] = value
        return cls(**values)

    @property
    def running(self) -> bool:
        return self.active_state == "active" and self.sub_state == "running"

    def describe(self) -> str:
        """``active (running)``, ``failed (failed), result exit-code, exit status 76`` ..."""
        text = f"{self.active_state or 'unknown'} ({self.sub_state or 'unknown'})"
        if self.result and self.result != "success":
            text += f", result {self.result}"
        if self.exec_main_status:
            text += f", exit status {self.exec_main_status}"
        return text


def _subprocess_runner(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **_QUIET_ENV),
        check=False,
    )


class Service:
    """``defender-iot-micro-agent.service`` on the system under ``root``."""

    def __init__(
        self,
        root: Path | str = "/",
        *,
        runner: Callable[[list[str], float], subprocess.CompletedProcess] | None = None,
        journal: Callable | None = None,
        environ: dict | None = None,
        manages_root: bool | None = None,
    ):
        self.root = Path(root)
        # Whether the systemd that systemctl reaches manages the tree under root.
        self.manages_root = (self.root.resolve() == Path("/") if manages_root is None
                             else manages_root)
        self.unit = UNIT
        self._run = runner or _subprocess_runner
        self._journal = journal
        self._environ = os.environ if environ is None else environ

    # -- may we touch the service at all? ---------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why systemd must not be asked about this tree at all, or None. Runs nothing."""
        if self._environ.get("DPKG_ROOT"):
            return f"DPKG_ROOT is set ({self._environ['DPKG_ROOT']})"
        if not self.manages_root:
            return (f"--root {self.root} is not /, and the host's systemd does not manage "
                    "that tree")
        if not (self.root / SYSTEMD_RUNNING).is_dir():
            return f"systemd is not running (no /{SYSTEMD_RUNNING})"
        return None

    def skip_reason(self) -> str | None:
        """Why a restart must not happen here, or None when systemd runs and allows it.

        Asks the host's policy-rc.d, so only writers call it (readers use
        :meth:`unavailable_reason`)."""
        reason = self.unavailable_reason()
        if reason:
            return reason
        policy = self.root / POLICY_RC_D
        if os.access(policy, os.X_OK):
            try:
                code = self._run([str(policy), self.unit, "restart"], 10).returncode
            except (OSError, subprocess.SubprocessError):
                code = None
            if code == POLICY_FORBIDDEN:
                return f"/{POLICY_RC_D} forbids it (exit {POLICY_FORBIDDEN})"
        return None

    # -- systemctl --------------------------------------------------------------------------
    def systemctl(self, *args: str, timeout: float = 30, check: bool = True):
        """Run ``systemctl ARGS``; raise ServiceError (with systemctl's message) on failure."""
        argv = [SYSTEMCTL, *args]
        try:
            proc = self._run(argv, timeout)
        except subprocess.TimeoutExpired:
            raise ServiceError(
                f"'{' '.join(argv)}' did not finish within {timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise ServiceError(f"cannot run {SYSTEMCTL}: {exc.strerror}") from None
        if check and proc.returncode != 0:
            message = (proc.stderr or proc.stdout or "").strip().splitlines()
            detail = message[0] if message else f"exit status {proc.returncode}"
            raise ServiceError(f"'{' '.join(argv)}' failed: {detail}")
        return proc

    def show(self) -> UnitState:
        proc = self.systemctl("show", "-p", ",".join(SHOW_PROPERTIES), self.unit)
        return UnitState.parse(proc.stdout)

    def restart(self, timeout: float = 90) -> None:
        """Restart once; for Type=notify systemctl waits for READY=1. ServiceError if it fails."""
        self.systemctl("restart", self.unit, timeout=timeout)

    def queue_restart(self) -> None:
        """Queue a restart and return at once (``--no-block``): for a unit ordered before this
        one, whose restart job waits for the caller's own job to finish (a synchronous
        restart there would wait for itself until a timeout)."""
        self.systemctl("--no-block", "restart", self.unit)

    def reset_failed(self) -> None:
        """Clear the failed state and the start-limit counter before a deliberate restart."""
        self.systemctl("reset-failed", self.unit, check=False)

    def state(self) -> dict | None:
        """Service state for ``status``/``check``; None when systemd is not to be asked."""
        if self.unavailable_reason():
            return None
        try:
            s = self.show()
        except ServiceError as exc:
            return {"active": False, "summary": str(exc)}
        summary = s.describe()
        if s.condition_result == "no":
            summary += ", not configured (start condition not met)"
        if s.status_text:
            summary += f", status: {s.status_text}"
        return {
            "active": s.running,
            "summary": summary,
            "status_text": s.status_text,  # the agent's own words ("connected to ...")
            "invocation_id": s.invocation_id,
            "main_pid": s.main_pid,
            "n_restarts": s.n_restarts,
            "enabled": s.unit_file_state,
        }

    # -- journal ----------------------------------------------------------------------------
    def journal_lines(self, invocation_id: str, count: int = 15) -> list[str]:
        """The last ``count`` journal lines of one invocation of the unit: the agent's own
        lines (``_SYSTEMD_UNIT``) and systemd's about it (``UNIT``, e.g. the exit status)."""
        try:
            reader = self._journal() if self._journal else _system_journal()
        except (ImportError, OSError) as exc:
            return [f"(journal not readable: {exc})"]
        try:
            reader.add_match(_SYSTEMD_UNIT=self.unit, _SYSTEMD_INVOCATION_ID=invocation_id)
            reader.add_disjunction()
            reader.add_match(UNIT=self.unit, INVOCATION_ID=invocation_id)
            lines = [_format_entry(entry) for entry in reader]
        finally:
            reader.close()
        return lines[-count:]


def _system_journal():
    from systemd import journal  # lazy: only needed when something failed

    return journal.Reader()


def _format_entry(entry: dict) -> str:
    when = entry.get("__REALTIME_TIMESTAMP")
    stamp = when.strftime("%H:%M:%S") if hasattr(when, "strftime") else ""
    ident = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM") or "?"
    pid = entry.get("_PID")
    message = entry.get("MESSAGE", "")
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    line = f"{stamp} {ident}[{pid}]: {message}" if pid else f"{stamp} {ident}: {message}"
    return printable(line)  # a line may quote a hub or proxy: one visible line, no escapes
