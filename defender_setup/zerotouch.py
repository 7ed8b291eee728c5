"""Zero-touch provisioning: the device registers itself with DPS, creates its own agent module
on the hub it is assigned to, and stores the module's connection string through the
provisioning core. The adapter behind ``defender-setup provision`` (and the DPS ways in of
debconf and the boot-time import).

Interface::

    run(root, enrollment, *, origin="dps", restart=True, timeout=30.0, lock_timeout=None,
        out, service=None, strict=False, bounds=None, clock=time.time, sleep=time.sleep)
        -> exit code
    reprovision(root, out, *, boot=False, bounds=None, clock=time.time, sleep=time.sleep)
        -> bool   # verify.settle's hook: a new set was written (restart and verify it)
    registration(root) -> dict | None      # the DPS record (status, check): never a secret
    made_by_dps(stored, record) -> bool    # the stored set is the identity DPS gave
    device_key(root, runner=None) -> bytes | None   # the kept device key (root-only)
    kept_enrollment(root, record) -> Enrollment | None  # dps.json + that key (None: X.509)
    key_like_set(agent, runner=None)       # the kept key sealed iff the set is (seal, unseal)
    RECORD = "dps.json", KEY_RECORD = "dps-device-key", MARKER (under /run)

``run``: 1. register with DPS (:mod:`defender_setup.dpsclient`; symmetric key, group key or
X.509), 2. create the module on the assigned hub with the device's credentials, with a key
made on this device (or update it with ``If-Match: *``; a device provisioned before keeps its
stored module key, so running it again changes nothing), 3. ``applying.apply`` with a
``provision.Request`` holding the module's connection string (origin ``dps``): the same plan,
commit, restart and verification as ``apply``. Nothing on disk changes before step 3: a
refusal, a timeout or SIGTERM (exit 143, within the current system call) leaves the device as
it was.

Kept in the agent directory's private state, under the writers' lock with the set: the
registration (``dps.json``: ID scope, registration ID, endpoint, attestation, hub, device,
time; no secret) and the device's own symmetric key (``dps-device-key``, root-only, sealed
with ``systemd-creds`` when the set is sealed), which re-provisioning needs. A group key is
only used to derive the device key and is never written.

``reprovision``: when the hub refuses the stored module identity (the agent exits 76) and the
set came from DPS with a device key kept, :func:`defender_setup.verify.settle` calls it once
per command (once per boot with ``boot``: a marker under ``/run``): register again and
re-create the module (the device may have been re-assigned to another hub, or its module
deleted) before it rolls back.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from . import applying, dpsclient, provision
from .agent.settings import load as load_settings
from .agentdir import DPS_RECORD, AgentDir, now
from .credentials import SEALED_NAMES
from .dps import SYMMETRIC_KEY, Enrollment
from .errors import EX_TERMINATED, SetupError
from .safefs import replace
from .sealing import decrypt, encrypt

RECORD = DPS_RECORD
KEY_RECORD = "dps-device-key"
MARKER = "run/defender-setup/reprovisioned"  # relative to a root: one re-provisioning a boot
ORIGIN = "dps"


class Terminated(SetupError):
    """SIGTERM arrived while talking to DPS or the hub: nothing was written."""

    exit_code = EX_TERMINATED


@contextmanager
def _terminable():
    """SIGTERM raises :class:`Terminated` in the main thread (blocking calls are interrupted:
    the waits and reads are ours, not a child's), restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame):
        raise Terminated("interrupted by SIGTERM while registering; nothing was written")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def registration(root) -> dict | None:
    """The last registration's record (``dps.json``), or None."""
    return AgentDir(root).record(RECORD)


def made_by_dps(stored, record: dict | None) -> bool:
    """Whether the stored set (``provision.Stored``) is the module identity of the recorded
    registration: stored by ``provision``, or that same set rolled back to."""
    if not record or stored is None:
        return False
    named = (record.get("assigned_hub"), record.get("device_id"), record.get("module_id"))
    return (stored.origin or {}).get("source") == ORIGIN or _stored_as(stored, *named) is not None


def _stored_as(stored, hub, device, module):
    """The stored set's connection string when it is this module identity, else None."""
    try:
        c = stored.loaded.connection_string
    except SetupError:
        return None
    return c if (c.host_name, c.device_id, c.module_id) == (hub, device, module) else None


def device_key(root, runner=None) -> bytes | None:
    """The device's own key kept for re-provisioning (decrypted when sealed), or None.

    :raises SealingError: it is sealed and does not decrypt on this machine.
    """
    kept = AgentDir(root).record(KEY_RECORD) or {}
    if isinstance(kept.get("sealed"), str):
        return decrypt(KEY_RECORD, kept["sealed"].encode("ascii"), runner).strip()
    key = kept.get("key")
    return key.encode("ascii") if isinstance(key, str) else None


def kept_enrollment(root, record: dict) -> Enrollment | None:
    """The recorded enrollment with the kept device key, checked (re-provisioning and check's
    dps-auth use it); None: no key is kept (X.509). :raises SetupError: the key does not
    decrypt or the record does not validate; KeyError, TypeError: a field is missing."""
    key = device_key(root)
    if key is None:
        return None
    return Enrollment(record["id_scope"], record["registration_id"], SYMMETRIC_KEY, key=key,
                      endpoint=record["endpoint"], module_id=record["module_id"]).checked(root)


def key_like_set(agent, runner=None, key: bytes | None = None) -> None:
    """Keep the device key (``key``, or the one kept already) sealed when the stored set is
    sealed and plain when it is not; nothing kept, nothing done. The caller holds the lock."""
    if key is None:
        try:
            key = device_key(agent.root, runner)
        except SetupError:  # sealed on another machine: left as it is (check says so)
            return
        if key is None:
            return
    if set(SEALED_NAMES.values()) & agent.current().keys():  # the set as stored is sealed
        agent.save_record(KEY_RECORD, {"sealed": encrypt(KEY_RECORD, key, runner)
                                       .decode("ascii")})
    else:
        agent.save_record(KEY_RECORD, {"key": key.decode("ascii")})


def _stored_key(stored, assigned, module: str) -> str | None:
    """The module key of the stored set when it is the same DPS identity (run again: keep)."""
    if (stored.origin or {}).get("source") != ORIGIN:
        return None
    c = _stored_as(stored, assigned.hub, assigned.device_id, module)
    return c.shared_access_key if c else None


def _obtain(root, enrollment: Enrollment, stored, out, bounds, clock, sleep) -> tuple:
    """Register and create the module; (connection string, assignment). Nothing written."""
    settings = load_settings(Path(root))
    how = "an enrollment group key" if enrollment.group_key else \
        "a symmetric key" if enrollment.attestation == SYMMETRIC_KEY else "an X.509 certificate"
    print(f"registering {enrollment.registration_id} with DPS {enrollment.endpoint} "
          f"(ID scope {enrollment.id_scope}, {how})", file=out)
    with _terminable(), dpsclient.Link.of(enrollment, settings, bounds) as link:
        deadline = time.monotonic() + link.bounds.total
        assigned = dpsclient.register(link, enrollment, clock=clock, sleep=sleep,
                                      deadline=deadline)
        print(f"assigned: hub {assigned.hub}, device {assigned.device_id}"
              + (f" ({assigned.substatus})" if assigned.substatus else ""), file=out)
        kept = _stored_key(stored, assigned, enrollment.module_id) if stored else None
        key, how = dpsclient.create_module(link, enrollment, assigned, kept, clock=clock,
                                           deadline=deadline)
    print(f"module {assigned.device_id}/{enrollment.module_id} {how} on {assigned.hub} "
          f"({'the stored key kept' if kept else 'with a key made on this device'})", file=out)
    text = (f"HostName={assigned.hub};DeviceId={assigned.device_id};"
            f"ModuleId={enrollment.module_id};SharedAccessKey={key}")
    return text.encode("ascii"), assigned


def _keeper(enrollment: Enrollment, assigned):
    """``applying.apply``'s ``on_commit``: keep the registration and the device key beside the
    set, under the same lock (the key sealed when the set is)."""
    def keep(agent, plan, _lines):
        key = enrollment.device_key
        record = {"id_scope": enrollment.id_scope, "registration_id": enrollment.registration_id,
                  "endpoint": enrollment.endpoint, "attestation": enrollment.attestation,
                  "group_key": enrollment.group_key, "module_id": enrollment.module_id,
                  "assigned_hub": assigned.hub, "device_id": assigned.device_id,
                  "substatus": assigned.substatus, "registered": now(),
                  "device_key_kept": key is not None}
        if key is None:
            agent.drop_record(KEY_RECORD)
        else:
            key_like_set(agent, key=key)
        agent.save_record(RECORD, record)
    return keep


def run(root, enrollment: Enrollment, *, origin: str = ORIGIN, restart: bool = True,
        timeout: float = 30.0, lock_timeout: float | None = None, out, service=None,
        strict: bool = False, bounds=None, clock=time.time, sleep=time.sleep,
        held_back: str = "restart skipped (--no-restart)") -> int:
    """See the module docstring; the exit code (``applying.apply``'s, or a
    :class:`~defender_setup.dpsclient.DpsError` raised before anything is written)."""
    enrollment = enrollment.checked(root)
    stored = provision.read(AgentDir(root), lock_timeout)
    text, assigned = _obtain(root, enrollment, stored, out, bounds, clock, sleep)
    request = provision.Request(connection_string=text, origin=origin)
    return applying.apply(root, request, out=out, restart=restart, timeout=timeout,
                          strict=strict, lock_timeout=lock_timeout, service=service,
                          on_commit=_keeper(enrollment, assigned), held_back=held_back)


def reprovision(root, out, *, boot: bool = False, bounds=None, clock=time.time,
                sleep=time.sleep) -> bool:
    """Register again with the kept device key and re-create the module, once; True when a
    new set was written (the caller holds the writers' lock, restarts and verifies).
    False, saying why, when the set is not DPS's, no key is kept, it was tried this boot, or
    DPS or the hub refuse (the caller then rolls back as usual)."""
    agent = AgentDir(root)
    record = agent.record(RECORD)
    try:
        stored = provision.read_locked(agent)
    except SetupError:
        return False
    if not made_by_dps(stored, record):
        return False
    marker = Path(root) / MARKER
    if boot and marker.exists():
        print("re-provisioning: not tried again: tried once this boot already", file=out)
        return False
    try:
        enrollment = kept_enrollment(root, record)
        if enrollment is None:
            print("re-provisioning: not possible: no device key is kept (X.509 attestation: "
                  "run 'defender-setup provision' again)", file=out)
            return False
        if boot:
            _mark(marker, record)
        print("the hub refused the module identity: registering with DPS again (once)",
              file=out)
        text, assigned = _obtain(root, enrollment, stored, out, bounds, clock, sleep)
        p = provision.plan(provision.Request(connection_string=text, origin=ORIGIN), stored)
        lines = provision.commit(agent, p)
        _keeper(enrollment, assigned)(agent, p, lines)
    except Terminated:
        raise  # SIGTERM ends the command, it does not fall through to the roll-back
    except (SetupError, KeyError, TypeError) as exc:
        print(f"re-provisioning failed: {exc}", file=out)
        return False
    if not lines:
        print("re-provisioning: DPS gave the same identity; nothing new to try", file=out)
        return False
    print(f"{lines[0]} (re-provisioned: previous set kept for 'defender-setup rollback')",
          file=out)
    return True


def _mark(marker: Path, record: dict) -> None:
    # Root's, as the re-provisioning unit's RuntimeDirectoryMode= makes it: the debconf probe
    # note shares the directory and refuses one that others can read. Replaced atomically.
    data = json.dumps({"registration_id": record.get("registration_id"), "time": now()})
    try:
        marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace(marker, (data + "\n").encode(), 0o600)
    except OSError:  # no /run (a chroot): the command's own "once" still holds
        pass
