"""The debconf answers of the ``dps`` method: an enrollment, checked, then registered or deferred.

Interface (called by :mod:`defender_setup.debconf_bridge` for ``auth-method`` ``dps``)::

    enrollment_of(answers, read) -> dps.Enrollment | None   # None: no new secret, keep
    deferral(root) -> str | None                            # why not register here
    check(answers, root, stored_origin, read, deferred) -> dps.Enrollment | None  # checked
    apply(answers, root, out, stored_origin, read, deferred, register, strict) -> int

What each answer becomes: ``dps-id-scope``, ``dps-registration-id`` (empty: the machine id),
``dps-attestation``, ``dps-symmetric-key`` (a password, the device's own key or, with
``dps-key-is-group-key``, the enrollment group's), ``dps-endpoint``, ``module-id``; X.509
reads ``certificate-file`` and ``private-key-file``. The key travels from debconf to here over
the debconf protocol only, and is cleared by the bridge whatever happens.

Why registration waits in an image build: where the agent cannot be restarted (a chroot,
``DPKG_ROOT``, no running systemd, policy-rc.d forbidding it) this is not the device that will
run the image. Registering would enrol the build machine under a machine id that is not
final (an image ships ``/etc/machine-id`` empty, and each device gets its own at first boot),
and would bake a module key into every copy. So the answers are only checked (the machine id
by a stand-in), nothing is stored, and each device registers at its first boot when it is
offered the ID scope and key (``defender-setup import``: systemd credentials or the boot drop
folder). The group key is never written by the package.

Why DPS out of reach does not fail the dpkg run (unless ``strict-verify``): nothing was
written, the answers may be right, and a package left half-configured by a network outage
could not even be reconfigured. It says so, and the device stays unconfigured. DPS refusing
the answers (a wrong key, a disabled enrollment) fails it, naming the question, as an invalid
answer does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .errors import CERTIFICATE, EX_OK, Field, SetupError, ValidationError

# Only for validating in an image build: any registration id DPS accepts; never registered.
IMAGE_STAND_IN = "image-build"
ORIGIN = "dps"
NOT_NOW = ("unreachable", "throttled")  # DpsError reasons that say nothing about the answers


def enrollment_of(answers, read):
    """The enrollment the answers give (not yet checked), or None when they give no new
    secret (an empty key, or no certificate and key file): "keep what is configured".

    :param read: ``read(path, field) -> bytes`` for the certificate and key files.
    """
    from . import dps

    common = {"id_scope": answers.dps_id_scope,
              "registration_id": answers.dps_registration_id or None,
              "endpoint": answers.dps_endpoint or dps.GLOBAL_ENDPOINT,
              "module_id": answers.module_id or dps.DEFAULT_MODULE}
    if answers.dps_attestation == dps.X509:
        if not answers.certificate_file and not answers.private_key_file:
            return None
        # One missing path: the enrollment's check names the missing file.
        cert = read(answers.certificate_file, CERTIFICATE) if answers.certificate_file \
            else None
        key = read(answers.private_key_file, Field.PRIVATE_KEY) \
            if answers.private_key_file else None
        return dps.Enrollment(attestation=dps.X509, certificate=cert, private_key=key,
                              **common)
    if not answers.dps_key:
        return None
    # An unknown attestation is passed on: the enrollment's check names it.
    return dps.Enrollment(attestation=answers.dps_attestation or dps.SYMMETRIC_KEY,
                          key=answers.dps_key.encode("utf-8"),
                          group_key=answers.dps_group_key, **common)


def deferral(root: Path | str) -> str | None:
    """Why this system must not register (an image build), or None on the device itself."""
    from .service import Service

    return Service(root).skip_reason()


def check(answers, root: Path | str, stored_origin, read, deferred: bool):
    """The config script's deep check, and the postinst's first step: the checked enrollment,
    or None (keep). Validation only, never the network (registering creates a device; that is
    the postinst's one step).

    :raises SetupError: routed by its field; nothing is written.
    """
    from . import dps

    e = enrollment_of(answers, read)
    if e is None:  # no new secret: fine when the stored set came from DPS (kept as it is)
        if stored_origin == ORIGIN:
            return None
        if answers.dps_attestation == dps.X509:
            raise ValidationError(CERTIFICATE, "is empty; give the path of the device "
                                  "certificate for DPS (its CN is the registration ID)")
        raise ValidationError(Field.DPS_KEY, "is empty; preseed or enter the enrollment's "
                              "primary key (base64)")
    if deferred and e.attestation == dps.SYMMETRIC_KEY and not e.registration_id:
        # The machine id of an image is not final (often "uninitialized"): check the rest.
        return replace(e, registration_id=IMAGE_STAND_IN).checked(root)
    return e.checked(root)


def apply(answers, root: Path | str, out, *, stored_origin, read, deferred: str | None,
          register, strict: bool = False) -> int:
    """Register and store (postinst ``configure``), or only check in an image build.

    :param deferred: :func:`deferral`'s reason, or None on the running device.
    :param register: :func:`defender_setup.zerotouch.run` (tests pass their own).
    :param strict: ``strict-verify``: DPS out of reach fails the run too.
    :returns: the exit code; the restart is the postinst trigger's, as for every method.
    """
    e = check(answers, root, stored_origin, read, bool(deferred))
    if e is None:
        print("defender-setup: no new DPS key or certificate given; the configured "
              "identity is kept", file=out)
        return EX_OK
    if deferred:
        print(f"defender-setup: DPS answers checked; not registered here ({deferred}): the "
              "device registers at its first boot when it is offered the ID scope and key "
              "(systemd credentials defender-setup.dps-id-scope and "
              "defender-setup.dps-group-key or defender-setup.dps-symmetric-key, or the boot "
              "drop folder; see defender-setup(8), import). Nothing was stored.", file=out)
        return EX_OK
    try:
        return register(Path(root), e, origin=ORIGIN, restart=False, out=out,
                        held_back="the package's trigger restarts and verifies the service")
    except SetupError as exc:
        if strict or getattr(exc, "reason", None) not in NOT_NOW:
            raise
        print(f"defender-setup: not registered: {exc}; nothing was written and the agent "
              "stays unconfigured: run 'dpkg-reconfigure defender-setup' (or "
              "'defender-setup provision') once DPS can be reached", file=out)
        return EX_OK
