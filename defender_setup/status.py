"""``defender-setup status``: what is configured, as data and as readable lines (no secrets).

Interface::

    collect(root: Path, service_state: dict | None = None, lock_timeout=5) -> dict  # JSON
    render(report: dict) -> list[str]

Read-only: one snapshot of the stored set under the readers' shared lock
(``provision.read``) and nothing is created, repaired or deleted; an update left half done is
reported, not completed.
"""

from __future__ import annotations

from pathlib import Path

from . import UNIT
from .agentdir import DPS_RECORD, IMPORT_RECORD, AgentDir
from .checks import INTERRUPTED, UNCONFIGURED, last_import
from .errors import BusyError, SetupError
from .provision import read
from .sealing import PLAIN_LEFT


def _certificate(info) -> dict:
    return {
        "subject": info.subject,
        "issuer": info.issuer,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "sha1_thumbprint": info.sha1_thumbprint,
        "sha256_thumbprint": info.sha256_thumbprint,
        "key": info.key_description,
        "chain_length": info.chain_length,
    }


def collect(root: Path, service_state: dict | None = None, lock_timeout: float = 5.0) -> dict:
    """Read the agent directory and describe it; never raises for bad content.

    :raises BusyError: when a writer kept the lock for ``lock_timeout`` seconds.
    """
    agent = AgentDir(root)
    target = agent.target
    # Structured for fleet tools (the JSON schema); rendered as one line below.
    report: dict = {"agent": {"package": target.package, "version": target.version,
                              "microsoft": target.microsoft, "summary": target.describe()},
                    "agent_dir": str(agent.path),
                    "method": None, "identity": None,
                    "certificate": None, "problem": None, "warnings": [], "files": {},
                    "previous_generation": False, "interrupted_update": False,
                    "origin": None, "service": service_state,
                    "last_import": agent.record(IMPORT_RECORD), "sealing": None,
                    "dps": agent.record(DPS_RECORD)}
    try:
        stored = read(agent, lock_timeout)  # one snapshot: sealed files decrypted once
    except BusyError:
        raise
    except SetupError as exc:
        report["problem"] = str(exc)
        return report
    report["files"] = {path: f"{mode:04o}" for path, mode in stored.modes.items()}
    report["previous_generation"] = stored.previous
    report["origin"] = stored.origin
    if stored.pending:
        report["interrupted_update"] = True
        report["problem"] = INTERRUPTED
        return report
    if stored.method is None:
        report["problem"] = UNCONFIGURED
        return report
    report["method"] = stored.method
    how = stored.sealing
    left = list(stored.plain_left)
    report["warnings"] = [PLAIN_LEFT.format(", ".join(left))] if left else []
    report["sealing"] = {"sealed": list(how.sealed), "keys": how.keys,
                         "pending": stored.seal_pending, "plain_previous": left,
                         "summary": how.describe() + ("; sealing deferred to the first boot"
                                                      if stored.seal_pending else "")}
    if how.error:
        report["problem"] = f"the sealed credentials cannot be read: {how.error}"
        return report
    try:
        validated = stored.loaded  # with the same rules as new input
    except SetupError as exc:
        report["problem"] = f"stored credentials are invalid: {exc}"
        return report
    c = validated.connection_string
    report["identity"] = {"hub": c.host_name, "device": c.device_id, "module": c.module_id,
                          "gateway": c.gateway_host_name}
    if validated.certificate is not None:
        report["certificate"] = _certificate(validated.certificate)
    report["warnings"] += validated.warnings
    return report


def render(report: dict) -> list[str]:
    lines = [f"agent:           {report['agent']['summary']}",
             f"agent directory: {report['agent_dir']}"]
    if report["method"]:
        lines.append(f"method:          {report['method']}")
    ident = report["identity"]
    if ident:
        lines += [f"hub:             {ident['hub']}",
                  f"device:          {ident['device']}",
                  f"module:          {ident['module']}"]
        if ident["gateway"]:
            lines.append(f"gateway:         {ident['gateway']}")
    cert = report["certificate"]
    if cert:
        lines += [f"certificate:     {cert['subject']} (issuer {cert['issuer']})",
                  f"valid:           {cert['not_before']} to {cert['not_after']}",
                  f"SHA-1:           {cert['sha1_thumbprint']}",
                  f"SHA-256:         {cert['sha256_thumbprint']}",
                  f"key:             {cert['key']}"]
    if report["sealing"]:
        lines.append(f"secrets:         {report['sealing']['summary']}")
    lines += [f"file:            {mode} {path}" for path, mode in report["files"].items()]
    origin = report["origin"]
    if origin:
        lines.append(f"origin:          {origin.get('source', 'unknown')}, "
                     f"{origin.get('time', 'time unknown')}")
    lines.append("previous set:    " + ("kept (defender-setup rollback)"
                                      if report["previous_generation"] else "none"))
    service = report["service"]
    if service is not None:
        lines.append(f"service:         {UNIT}: {service.get('summary', 'unknown')}")
    dps = report.get("dps")
    if dps:
        how = "group key" if dps.get("group_key") else dps.get("attestation")
        lines += [f"DPS:             registration {dps.get('registration_id')}, ID scope "
                  f"{dps.get('id_scope')}, {dps.get('endpoint')} ({how})",
                  f"DPS assignment:  hub {dps.get('assigned_hub')}, device "
                  f"{dps.get('device_id')}, last registered {dps.get('registered')}"]
    last = report.get("last_import")
    if last:
        lines.append(f"last import:     {last_import(last)}")
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    if report["problem"]:
        lines.append(f"problem: {report['problem']}")
    return lines
