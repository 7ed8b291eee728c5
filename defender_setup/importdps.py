"""The boot import of a DPS offer (zero-touch): the device registers itself and creates its
own module, through :func:`defender_setup.zerotouch.run` (origin ``dps``).

Interface (called by :func:`defender_setup.importer.run` when the offer holds a DPS input,
``dps-id-scope``, ``dps-group-key``...)::

    enrollment_of(offer, root) -> dps.Enrollment     # checked; errors name the offered input
    run_dps(job, mode, offer) -> exit code

What is offered (systemd credentials ``defender-setup.NAME`` or drop-folder files ``NAME``):
``dps-id-scope``, a key (``dps-symmetric-key``: the device's own; ``dps-group-key``: its
enrollment group's, from which the device key is derived for its registration ID) or the
X.509 ``certificate``/``private-key``, optionally ``dps-registration-id`` (default: the machine
id) and ``dps-endpoint``. The group key is never written: only the module's connection string
(and the device key derived from it, root-only) are kept.

Guarantees kept from the import of a set:

* an ordinary boot, offered the enrollment this device was provisioned from, talks to no one
  and writes nothing (a private digest of the offer, ``import.dps``, says it was);
* at boot, the agent is restarted with ``--no-block`` and judged by the verify unit, as for a
  set; a module identity the hub then refuses is registered again once (zerotouch), then
  rolled back, and that offer is not imported again at boot while it stays the same;
* an offer DPS refuses (bad key, disabled enrollment, unreachable) changes nothing, is
  recorded with DPS's reason and noted in the drop folder; it is tried again at the next boot
  (nothing was written or restarted, and DPS's answer may change: an enrollment enabled);
* the drop folder's files are cleared once the device is provisioned;
* never in a tree that is not the running system (an image build): that machine is not the
  device, and its machine id is not final.
"""

from __future__ import annotations

from .errors import EX_OK, Field, SetupError, ValidationError

# importer.run imports this module only when it finds a DPS offer: no import cycle.
from .importer import labelled
from .offer import (
    DPS_ENDPOINT_FILE,
    DPS_GROUP_KEY_FILE,
    DPS_ID_SCOPE_FILE,
    DPS_REGISTRATION_ID_FILE,
    DPS_SYMMETRIC_KEY_FILE,
    Offer,
)

PROVISIONED = "import.dps"  # the digest of the offer this device was provisioned from


def _text(offer: Offer, name: str) -> str | None:
    data = offer.files.get(name)
    return None if data is None else data.decode("utf-8", "replace").strip()


def enrollment_of(offer: Offer, root):
    """The offered enrollment, checked (:func:`defender_setup.dps.enrollment`).

    :raises ValidationError: labelled with the credential or file it is about
        (:func:`defender_setup.importer.labelled`).
    """
    from . import dps
    from .credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE

    files = offer.files
    try:
        if CONNECTION_STRING_FILE in files:
            raise ValidationError(Field.CONNECTION_STRING, "is offered with a DPS ID scope; "
                                  "offer either a module's connection string or a DPS "
                                  "enrollment, not both")
        return dps.enrollment(_text(offer, DPS_ID_SCOPE_FILE) or "",
                              _text(offer, DPS_REGISTRATION_ID_FILE) or None,
                              symmetric_key=files.get(DPS_SYMMETRIC_KEY_FILE),
                              group_key=files.get(DPS_GROUP_KEY_FILE),
                              certificate=files.get(CERTIFICATE_FILE),
                              private_key=files.get(PRIVATE_KEY_FILE),
                              endpoint=_text(offer, DPS_ENDPOINT_FILE) or None, root=root)
    except SetupError as exc:
        raise labelled(exc, offer) from None


def _identity(agent) -> dict | None:
    from . import zerotouch

    reg = zerotouch.registration(agent.root) or {}
    if not reg:
        return None
    return {"method": "connection-string", "hub": reg.get("assigned_hub"),
            "device": reg.get("device_id"), "module": reg.get("module_id"),
            "registration_id": reg.get("registration_id"), "id_scope": reg.get("id_scope")}


def _provisioned_from(job, digest: str) -> bool:
    """True when a set is stored, and it came from DPS through this very offer."""
    seen = job.agent.record(PROVISIONED) or {}
    origin = (job.agent.origin() or {}).get("source")
    return origin == "dps" and seen.get("digest") == digest and job.agent.method() is not None


def run_dps(job, mode: str, offer: Offer) -> int:
    """Register the offered enrollment (see the module docstring); the exit code.

    :param job: the importer's run (its records, its service, its output, its lock wait).
    """
    from . import provision, zerotouch

    unavailable = job.svc.unavailable_reason()
    if unavailable:
        job.say(f"{offer.describe()} hold a DPS enrollment; not registered here "
                f"({unavailable}): a device registers itself on its own first boot")
        return EX_OK
    record = job.record_of(offer, dps=True)
    try:
        enrollment = enrollment_of(offer, job.root)
    except SetupError as exc:
        job.fail(record, exc, offer)
    digest = provision.digest(offer.files)
    if mode == "boot" and _provisioned_from(job, digest):
        return _keep(job, offer, record, enrollment)
    # Every write records a new origin (dated to the microsecond); an unchanged set keeps it.
    before = job.agent.origin()
    note = " (the group key is not stored)" if enrollment.group_key else ""
    job.say(f"{offer.describe()} hold a DPS enrollment: registering "
            f"{enrollment.registration_id}{note}")
    try:
        code = zerotouch.run(job.root, enrollment, origin="dps", restart=mode == "manual",
                             timeout=job.timeout, lock_timeout=job.wait, out=job.out,
                             service=job.svc, strict=True,
                             held_back="" if mode == "manual" else
                             "the service starts (or is verified) next, by the import's units"
                             if mode.startswith("boot") else "restart skipped (--no-restart)")
    except SetupError as exc:  # DPS or the hub refused, unreachable, ...: nothing written
        job.fail(record, labelled(exc, offer), offer)
    record = dict(record, identity=_identity(job.agent),
                  folder=str(offer.folder) if offer.folder else None)
    changed = job.agent.origin() != before
    if mode == "manual":
        return _verdict(job, code, record, digest)
    if code != EX_OK:
        job.fail(record, SetupError(f"provisioning ended with exit status {code}"), offer)
    job.agent.save_record(PROVISIONED, {"digest": digest, "time": record["time"]})
    if not changed:
        return _keep(job, offer, record, enrollment)
    job.save(record, result="written", message="verification pending")
    return job.start(mode, record, digest)  # zerotouch released the lock


def _keep(job, offer: Offer, record: dict, enrollment) -> int:
    job.say(f"already provisioned through DPS as {enrollment.registration_id} from "
            f"{offer.describe()}; nothing to do")
    return job.unchanged(offer, dict(record, identity=_identity(job.agent)),
                         "provisioned from this offer already", "already provisioned")


def _verdict(job, code: int, record: dict, digest: str) -> int:
    """``import`` by hand: zerotouch restarted and verified; recorded as a set's import is."""
    if code != EX_OK:
        job.rejected(record, "the provisioned module identity was not verified", code, digest)
        return code
    job.agent.save_record(PROVISIONED, {"digest": digest, "time": record["time"]})
    return job.verified(record, "provisioned through DPS and verified",
                        "provisioned and verified")
