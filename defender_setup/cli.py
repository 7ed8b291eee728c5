"""Command line: argparse subcommands and exit codes, nothing else (docs/design.md,
defender-setup(8)).

Modules are imported inside the commands that need them: ``validate`` is run cold by
maintainer scripts and people, and every import counts there (``make bench``).

``defender-setup <command> [options]``; ``main(argv) -> int``. Secrets are read from files or
``-`` (standard input), never from arguments or the environment.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import UNIT, __version__
from .errors import (
    CERTIFICATE,
    CONNECTION_STRING,
    EX_INTERRUPTED,
    EX_IOERR,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    PRIVATE_KEY,
    BusyError,
    Field,
    InputError,
    SetupError,
)
from .inputs import read_file, read_stream

EPILOG = """\
exit codes: 0 success (warnings may be printed), 2 usage error, 65 invalid credentials,
66 input file missing or unreadable, 69 service not active and stable, 70 internal error (a
bug), 73 cannot write, 74 standard output closed (broken pipe), 75 busy: another
defender-setup command holds the lock (try again), 77 unsafe target (symlink, writable by
others), 78 configuration problem.

Commands that change the credentials wait up to 30 s for one another (status and check
up to 5 s); --lock-timeout S changes that.

Secrets are read from files or '-' (standard input), never from the command line:
  defender-setup validate --method connection-string --connection-string-file - < cs.txt
  defender-setup apply --method certificate --connection-string-file cs.txt \\
      --certificate device.pem --private-key device.key
See defender-setup(8)."""


def _read_input(name: str | None, field: Field, stdin_used: list) -> bytes | None:
    if name is None:
        return None
    if name == "-":
        if stdin_used:
            raise InputError("only one input can come from standard input", field)
        stdin_used.append(field)
        # read_stream: closed (<&-, sys.stdin is None) or unreadable standard input is an
        # InputError, and no more than the limit + 1 bytes is read.
        return read_stream(getattr(sys.stdin, "buffer", None), field)
    if field is Field.DPS_KEY and not os.path.lexists(name):
        from .dps import looks_like_key

        # A "file name" that is the key itself is refused without repeating it.
        if looks_like_key(name):
            raise InputError("no such file, and the name given looks like a key: give a FILE "
                             "holding the key, or - and the key on standard input, never the "
                             "key itself on the command line", field)
    return read_file(name, field)


def _read_all(*named: tuple, missing: str, field: Field) -> list:
    """The ``(file name or None, field)`` inputs read in order, at most one of them from
    standard input; ``missing``: the error when none was given."""
    used: list = []
    data = [_read_input(name, what, used) for name, what in named]
    if all(d is None for d in data):
        raise InputError(missing, field)
    return data


def _request(args, **kw):
    """The credentials named on the command line as a provisioning request (read, not yet
    validated). A certificate and key alone re-key the stored certificate identity."""
    from .provision import Request

    text, cert, key = _read_all(
        (args.connection_string_file, CONNECTION_STRING), (args.certificate, CERTIFICATE),
        (args.private_key, PRIVATE_KEY), field=CONNECTION_STRING,
        missing="give --connection-string-file FILE (or - for standard input)")
    return Request(text, cert, key, method=args.method, **kw)


def cmd_validate(args, out) -> int:
    from .applying import print_found
    from .provision import NOTHING_STORED, plan

    validated = plan(_request(args), NOTHING_STORED).validated
    print_found(validated, out)
    print(f"valid: {validated.method} credentials for {validated.connection_string.device_id}/"
          f"{validated.connection_string.module_id}", file=out)
    return EX_OK


def _Writing(args, out):
    """``with _Writing(args, out) as agent``: :class:`defender_setup.applying.Writing`."""
    from .applying import Writing

    return Writing(args.root, out, args.lock_timeout)


def cmd_apply(args, out) -> int:
    from .agentdir import AgentDir
    from .applying import apply

    # Microsoft's agent says nothing about the hub: there the probe is the hub's answer.
    probing = args.probe or AgentDir(args.root).target.microsoft
    request = _request(args, seal=True if args.seal else None, probe=probing,
                       origin="apply")  # before any lock: standard input may take a while
    return apply(args.root, request, out=out, restart=not args.no_restart,
                 timeout=args.timeout, strict=args.strict, lock_timeout=args.lock_timeout,
                 service=args.service, probe_asked=args.probe)


def cmd_provision(args, out) -> int:
    from .dps import enrollment
    from .zerotouch import run

    symmetric, group, cert, key = _read_all(
        (args.symmetric_key_file, Field.DPS_KEY), (args.group_key_file, Field.DPS_KEY),
        (args.certificate, CERTIFICATE), (args.private_key, PRIVATE_KEY), field=Field.DPS_KEY,
        missing="give --symmetric-key-file FILE, --group-key-file FILE, or --certificate "
        "FILE --private-key FILE (- for standard input)")
    e = enrollment(args.id_scope, args.registration_id, symmetric_key=symmetric,
                   group_key=group, certificate=cert, private_key=key, endpoint=args.endpoint,
                   module_id=args.module, root=args.root)
    return run(args.root, e, restart=not args.no_restart, timeout=args.timeout,
               lock_timeout=args.lock_timeout, out=out, service=args.service,
               strict=args.strict)


def cmd_reprovision(args, out) -> int:
    """Run by defender-setup-reprovision.service, which the agent's unit starts when it fails
    (``OnFailure=``): only when the hub refused the identity (exit 76) of a set that came from
    DPS, register again (once a boot), then restart and verify; anything else is left alone.
    An ordinary boot or a running agent otherwise never learns that the device moved hubs."""
    from . import zerotouch
    from .service import Service
    from .verify import refused, settle

    svc = args.service or Service(args.root)
    try:
        with _Writing(args, out):
            if not refused(svc.show()):
                print("nothing to do: the agent was not stopped by the hub refusing its "
                      "identity", file=out)
                return EX_OK
            if not zerotouch.reprovision(args.root, out, boot=True):
                print("not re-provisioned: the agent stays stopped; 'defender-setup check' "
                      "says why the hub refuses it", file=out)
                return EX_OK
            return settle(args.root, timeout=args.timeout, strict=False, out=out,
                          service=args.service, boot=True).code
    except BusyError:  # the command holding the lock verifies the agent itself
        print("nothing to do: another defender-setup command is verifying the agent", file=out)
        return EX_OK


def cmd_seal(args, out) -> int:
    """``seal`` / ``unseal``: store the current set sealed, or as plain files again."""
    from . import provision, sealing
    from .applying import print_stored
    from .zerotouch import key_like_set

    want = args.command == "seal"
    if want:  # before the lock, which writes to the agent directory
        sealing.require(args.root)
    with _Writing(args, out) as agent:
        stored = provision.read_locked(agent)
        p = provision.plan(provision.Request.again(stored, seal=want, origin=args.command),
                           stored)
        lines = provision.commit(agent, p)
        key_like_set(agent)  # a DPS device key kept beside the set follows it
        if not lines:
            later = "; sealing deferred to the first boot" if stored.seal_pending else ""
            print(f"nothing to do: the credentials are {stored.sealing.describe()}{later}",
                  file=out)
            return EX_OK
        print_stored(lines, out, agent.has_previous())
        if args.no_restart:
            print("restart skipped (--no-restart)", file=out)
            return EX_OK
        return _restart(args, out)


def _restart(args, out) -> int:
    from .verify import settle

    return settle(args.root, timeout=args.timeout, strict=args.strict, out=out,
                  service=args.service).code


def cmd_restart(args, out) -> int:
    with _Writing(args, out):
        return _restart(args, out)


def cmd_rollback(args, out) -> int:
    with _Writing(args, out) as agent:
        restored = agent.rollback()
        print(f"rolled back: {', '.join(sorted(restored))} restored in {agent.path}", file=out)
        return EX_OK if args.no_restart else _restart(args, out)


def cmd_repair(args, out) -> int:
    """Run by the unit before the agent starts: complete an interrupted update, if any.

    Never waits long: the writer holding the lock may be the one restarting the service and
    waiting for this very start. Nothing pending means nothing is touched or created, and
    nothing refused either: whatever else is wrong, the agent and ``check`` report it (a
    planted link in the private state must not keep a healthy set from starting).
    """
    from .applying import Writing

    writing = Writing(args.root, out, 2.0 if args.lock_timeout is None else args.lock_timeout)
    if not writing.agent.pending():
        return EX_OK
    try:
        with writing:  # taking the writers' lock completes the update
            pass
    except BusyError as exc:
        print(f"repair skipped: {exc}", file=out)
    return EX_OK


def cmd_import(args, out) -> int:
    from .importer import run

    mode = "boot" if args.boot else "boot-verify" if args.boot_verify else \
        "no-restart" if args.no_restart else "manual"
    return run(args.root, mode, timeout=args.timeout, out=out, lock_timeout=args.lock_timeout)


def _service_state(root: str) -> dict | None:
    from .service import Service

    service = Service(root)
    state = service.state()
    if state is None:  # chroot, image build, another tree: say why instead of guessing
        state = {"active": None, "summary": f"not checked: {service.unavailable_reason()}"}
    return state


def _read_wait(args) -> float:
    from .agentdir import READ_WAIT

    return READ_WAIT if args.lock_timeout is None else args.lock_timeout


def cmd_status(args, out) -> int:
    import json
    from pathlib import Path

    from .status import collect, render

    report = collect(Path(args.root), _service_state(args.root), lock_timeout=_read_wait(args))
    if args.json:
        from .schema import status_document

        print(json.dumps(status_document(report), indent=2, sort_keys=True), file=out)
    else:
        for line in render(report):
            print(line, file=out)
    return EX_OK


def cmd_check(args, out) -> int:
    import json
    from pathlib import Path

    from . import dpscheck
    from .agentdir import AgentDir
    from .checks import render, run_checks
    from .netcheck import extend
    from .provision import read

    agent = AgentDir(Path(args.root))  # the agent in use decides the directory (target.py)
    agent_dir = agent.path
    if os.geteuid() != 0 and _unreadable(agent_dir):
        print(f"defender-setup: check needs root: the credentials in {agent_dir} are readable "
              "by root only (it changes nothing); run: sudo defender-setup check",
              file=sys.stderr)
        return EX_NOPERM
    root, state, wait = Path(args.root), _service_state(args.root), _read_wait(args)
    try:  # one snapshot for the local and the network checks: the same set for both
        stored = read(agent, wait)
    except BusyError:  # a writer kept the lock: exit 75, not a failed check
        raise
    except SetupError:
        stored = None  # agent-dir-safe reports it
    results = run_checks(root, state, lock_timeout=wait, stored=stored)
    results = extend(root, results, state, offline=args.offline, dont_run=args.dont_run,
                     stored=stored)
    results = dpscheck.extend(root, results, offline=args.offline, dont_run=args.dont_run,
                              stored=stored)
    unknown = set(args.dont_run) - {r.id for r in results}
    if unknown:
        print(f"defender-setup: warning: --dont-run: no check named {', '.join(sorted(unknown))}",
              file=sys.stderr)
    if args.json:
        from .schema import check_document

        print(json.dumps(check_document(results), indent=2), file=out)
    else:
        for line in render(results):
            print(line, file=out)
    return max((r.exit_code for r in results), default=EX_OK)


def cmd_metrics(args, out) -> int:
    """Prometheus textfile metrics (the timer's command): local checks only, never the
    network ones (hub-auth would connect as the running identity and knock the agent off)."""
    from pathlib import Path

    from .metrics import TEXTFILE_DIR, collect, render, textfile_dir, write

    directory = textfile_dir(args.root)
    if directory is None and not args.print:
        print(f"nothing written: {Path(args.root) / TEXTFILE_DIR} does not exist (install "
              "prometheus-node-exporter)", file=out)
        return EX_OK
    try:
        text = render(collect(Path(args.root), _read_wait(args)))
    except BusyError as exc:
        if args.print:
            raise
        # The command holding the lock writes the metrics itself when it ends.
        print(f"nothing written: {exc}", file=out)
        return EX_OK
    if args.print:
        print(text, end="", file=out)
    else:
        print(f"wrote {write(directory, text)}", file=out)
    return EX_OK


def _unreadable(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    return not os.access(path, os.R_OK | os.X_OK)


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seconds(low: float, high: float):
    """An argparse type: seconds from ``low`` to ``high``. float() alone takes -1, nan and inf,
    and a --timeout below what a verification needs judges a healthy agent unstable."""
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # false for nan as well
            raise argparse.ArgumentTypeError(f"must be a number of seconds from {low:g} to "
                                             f"{high:g}")
        return value

    seconds.bounds = (low, high)  # read by a test: every numeric option is bounded
    return seconds


# The verdict needs a restart (Type=notify: until READY=1) plus 1.5 s of stability.
_TIMEOUT = _seconds(5, 3600)
_LOCK_TIMEOUT = _seconds(0, 3600)  # 0: a single try


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default="/", metavar="DIR",
                        help="operate on the tree under DIR instead of / (default: /)")
    creds = argparse.ArgumentParser(add_help=False)
    creds.add_argument("--method", choices=("connection-string", "certificate"),
                       help="authentication method (default: inferred from the inputs)")
    creds.add_argument("--connection-string-file", metavar="FILE",
                       help="file holding the connection string, or - for standard input")
    creds.add_argument("--certificate", metavar="FILE",
                       help="PEM certificate (chain allowed, leaf first)")
    creds.add_argument("--private-key", metavar="FILE", help="PEM private key (unencrypted)")
    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--timeout", type=_TIMEOUT, default=30.0, metavar="S",
                        help="seconds to wait for the service to become active (default 30)")
    service = argparse.ArgumentParser(add_help=False)
    service.add_argument("--strict", action="store_true",
                         help="exit 69 when verification fails, even after a successful "
                         "roll-back (for image pipelines)")
    locking = argparse.ArgumentParser(add_help=False)
    locking.add_argument("--lock-timeout", type=_LOCK_TIMEOUT, metavar="S",
                         help="seconds to wait while another defender-setup command holds the "
                         "lock, then exit 75 (default 30; 5 for status and check)")

    parser = argparse.ArgumentParser(
        prog="defender-setup", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Provision the Defender for IoT micro agent's authentication ({UNIT}).",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # An explicit prog spares argparse building a formatter (and importing shutil) at start.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                prog="defender-setup")

    def add(name, func, parents, help_text):
        p = sub.add_parser(name, parents=parents, help=help_text, description=help_text,
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    add("validate", cmd_validate, [common, creds], "validate credentials only; print what was "
        "found (secrets redacted)")
    writer = [common, timing, service, locking]
    p = add("apply", cmd_apply, [creds, *writer], "validate, write atomically (keeping the "
            "previous set), then restart and verify the service")
    p.add_argument("--no-restart", action="store_true", help="write the files only")
    p.add_argument("--seal", action="store_true", help="store the secret files sealed with "
                   "this machine's key (systemd-creds: TPM2 and host key, or host key); a "
                   "sealed set stays sealed without it")
    for name, what in (("seal", "store the current secret files sealed with this machine's "
                                "key (deferred to the first boot in a chroot)"),
                       ("unseal", "store the current sealed secret files as plain root-only "
                                  "files again")):
        q = add(name, cmd_seal, writer, f"{what}, then restart and verify")
        q.add_argument("--no-restart", action="store_true", help="change the files only")
    p.add_argument("--probe", action="store_true",
                   help="first try the new credentials against the hub (one CONNECT); write "
                   "nothing when the hub refuses them")
    add("restart", cmd_restart, writer, "restart the service once and verify it is active and "
        "stable; roll back on failure")
    p = add("provision", cmd_provision, writer, "zero-touch: register this device with the "
            "Device Provisioning Service (DPS), create its agent module on the assigned hub "
            "with a key made here, store the module's connection string, then restart and "
            "verify the service")
    p.add_argument("--id-scope", required=True, metavar="SCOPE",
                   help="the DPS ID scope (0ne followed by 8 hexadecimal digits)")
    p.add_argument("--registration-id", metavar="ID", help="the registration ID (default: "
                   "the machine ID from /etc/machine-id; X.509: the certificate's CN)")
    attestation = p.add_mutually_exclusive_group()
    attestation.add_argument("--symmetric-key-file", metavar="FILE", help="file holding the "
                             "enrollment's own symmetric key (base64), or - for standard input")
    attestation.add_argument("--group-key-file", metavar="FILE", help="file holding the "
                             "enrollment group's key (base64), or -: the device key is derived "
                             "from it and the group key is never stored")
    attestation.add_argument("--certificate", metavar="FILE", help="X.509 attestation: the "
                             "device certificate (PEM, chain allowed; its CN is the "
                             "registration ID)")
    p.add_argument("--private-key", metavar="FILE", help="the device certificate's private "
                   "key (PEM, unencrypted)")
    p.add_argument("--endpoint", default="global.azure-devices-provisioning.net",
                   metavar="HOST", help="the DPS device endpoint (default "
                   "global.azure-devices-provisioning.net; HOST:PORT for a private one)")
    p.add_argument("--module", default="DefenderIotMicroAgent", metavar="ID",
                   help="the module identity to create (default DefenderIotMicroAgent)")
    p.add_argument("--no-restart", action="store_true", help="write the files only")
    add("reprovision", cmd_reprovision, [common, locking, timing], "after the hub refused the "
        "agent's identity: when it came from DPS, register again (once a boot) and verify "
        "(run by defender-setup-reprovision.service)")
    p = add("status", cmd_status, [common, locking], "show method, identity, certificate, file "
            "modes and service state (secrets redacted)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("check", cmd_check, [common, locking], "full diagnosis with named checks (local "
            "files, the service, the path to the hub); changes nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--offline", action="store_true",
                   help="leave out the network checks (hub-dns, hub-tcp, hub-tls, hub-clock, "
                   "hub-auth, and dps-dns, dps-tcp, dps-tls, dps-auth)")
    p.add_argument("--dont-run", default=[], metavar="ID,...", type=_ids,
                   help="comma-separated check ids to leave out (reported as skipped)")
    p = add("metrics", cmd_metrics, [common, locking], "write Prometheus textfile metrics "
            "(defender_setup.prom) into node_exporter's directory "
            "/var/lib/prometheus/node-exporter, if it exists; local checks only, never the "
            "network checks (defender-setup-metrics.timer runs it every 5 minutes)")
    p.add_argument("--print", action="store_true", help="print the metrics instead of "
                   "writing them")
    p = add("rollback", cmd_rollback, writer, "restore the previous generation of credentials, "
            "then restart and verify")
    p.add_argument("--no-restart", action="store_true", help="restore the files only")
    add("repair", cmd_repair, [common, locking], "complete a credential update that was "
        "interrupted (the service runs it before the agent starts; never waits long)")
    p = add("import", cmd_import, [common, locking, timing], "import the credentials offered "
            "to this machine (systemd credentials defender-setup.*, or the boot partition's "
            "drop folder), then restart and verify the service")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-restart", action="store_true", help="write the files only")
    mode.add_argument("--boot", action="store_true", help="as defender-setup-import.service "
                      "runs it: write, queue the service's start, never wait for it")
    mode.add_argument("--boot-verify", action="store_true", help="as "
                      "defender-setup-import-verify.service runs it: verify what --boot "
                      "wrote once the service has started, roll back if it was refused")
    return parser


class _Output:
    """Standard output that survives a reader going away (``status | head -0``) or a closed
    descriptor: the command still completes (a writer must not stop between the write and the
    verification because nobody reads its report), and ``broken`` says the report was lost."""

    def __init__(self, stream):
        self.stream, self.broken = stream, stream is None

    def write(self, text: str) -> int:
        self._guarded(lambda: self.stream.write(text))
        return len(text)

    def flush(self) -> None:
        self._guarded(lambda: self.stream.flush())

    def _guarded(self, call) -> None:
        if not self.broken:
            try:
                call()
            except (BrokenPipeError, ValueError, OSError):
                self.broken = True

    def close_quietly(self) -> None:
        """After a broken pipe, keep the interpreter's own flush at exit from failing."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (AttributeError, ValueError, OSError):
            pass


def _error(text: str) -> None:
    try:
        print(f"defender-setup: {text}", file=sys.stderr)
    except (AttributeError, ValueError, OSError):  # standard error closed too: exit code only
        pass


def _where(exc: BaseException) -> str:
    """``TypeError at defender_setup/x.py:12 (function)``: the type and innermost frame only;
    the message is left out, as it could quote an input."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    path = last.filename
    cut = path.rfind("defender_setup/")
    return f"{type(exc).__name__} at {path[cut:] if cut >= 0 else path}:{last.lineno} " \
        f"({last.name})"


def main(argv: list[str] | None = None, *, parser=None, service=None) -> int:
    """:param parser: and ``service``: seams for tests (a command that fails unexpectedly; a
        ``service.Service`` managing a throw-away root)."""
    parser = parser or build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code or 0)
    args.service = service
    out = _Output(sys.stdout)
    try:
        code = args.func(args, out)
    except SetupError as exc:
        _error(f"error: {exc}")
        code = exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return EX_INTERRUPTED
    except Exception as exc:  # a bug: one line with where it happened, never a traceback
        _error(f"internal error: {_where(exc)}; please report it")
        code = EX_SOFTWARE
    out.flush()
    if out.broken:
        out.close_quietly()
        _error("error: standard output is closed (broken pipe?): the report was not written")
        return code or EX_IOERR
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
