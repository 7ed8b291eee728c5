"""The DPS checks of ``defender-setup check``, for a device provisioned through DPS.

Interface::

    extend(root, results, *, offline=False, dont_run=(), budget=BUDGET, stored=None)
        -> list[CheckResult]

They follow the hub's checks (:mod:`defender_setup.netcheck`) and use what ``provision``
used: the registration kept in ``dps.json``, conf.json's trust (``ca_file``) and proxy.

- ``dps-dns``: the endpoint's name resolves (the proxy's, with a proxy).
- ``dps-tcp``: its HTTPS port connects.
- ``dps-tls``: its certificate verifies against the agent's trust.
- ``dps-auth``: DPS accepts the kept device key and says where the device is assigned (POST
  ``…/registrations/{registrationId}``: a status query that changes nothing). A hub other than
  the stored identity's is a warning: the device was re-assigned.

All are ``skipped`` when the stored set is not the identity DPS gave (``provision``, or that
set rolled back to), with ``--offline`` and ``--dont-run``; a check whose prerequisite failed
is skipped. They run through the network checks' loop
(:func:`defender_setup.netcheck.run_in_order`): each is bounded by its ``PER_CHECK`` seconds
and all of them by ``budget``. Nothing is written.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from . import hubpath
from .agent import settings as settings_mod
from .checks import ERROR, OK, SKIPPED, WARNING, CheckResult
from .dps import SYMMETRIC_KEY, address
from .errors import EX_CONFIG, EX_OK, EX_UNAVAILABLE, SetupError
from .netcheck import run_in_order

BUDGET = 6.0
DESCRIPTIONS = {
    "dps-dns": "the DPS endpoint's name resolves (through the proxy when one is set)",
    "dps-tcp": "the DPS endpoint's HTTPS port accepts a TCP connection",
    "dps-tls": "the DPS endpoint's TLS certificate verifies against the agent's trust",
    "dps-auth": "DPS accepts the kept device key and names the hub this device is on",
}
NEEDS = {"dps-tcp": ("dps-dns",), "dps-tls": ("dps-tcp",), "dps-auth": ("dps-tls",)}


def extend(root, results: list, *, offline: bool = False, dont_run=(), budget: float = BUDGET,
           stored=None) -> list[CheckResult]:
    """See the module docstring."""
    from .zerotouch import made_by_dps, registration

    record, context, blocked = registration(Path(root)), None, None
    if not made_by_dps(stored, record):
        blocked = "not provisioned through DPS (defender-setup provision)"
    elif not offline:
        try:
            context = _Context(Path(root), record, stored)
        except SetupError as exc:  # the reason wins over --dont-run here
            blocked, dont_run = f"cannot be run: {exc}", ()
    return list(results) + run_in_order(CHECKS, context, NEEDS, DESCRIPTIONS, offline=offline,
                                        dont_run=dont_run, blocked=blocked, budget=budget,
                                        kind="DPS")


class _Context:
    """What the DPS checks share: the registration, the settings, the addresses found."""

    def __init__(self, root: Path, record: dict | None, stored):
        """:raises SetupError: no usable registration record (its endpoint included), or
        conf.json is not valid."""
        if not record or not isinstance(record.get("endpoint"), str):
            raise SetupError("no DPS registration is recorded (dps.json)")
        self.record, self.stored, self.root = record, stored, root
        self.settings = settings_mod.load(root)
        self.addresses = None
        self.host, self.port = address(record["endpoint"])
        self.where = record["endpoint"]

    def _link(self, limit: float):
        from .dpsclient import Bounds, Link

        return Link.of(None, self.settings, Bounds(limit, limit))

    def dps_dns(self, limit: float):
        try:
            self.addresses = hubpath.first_hop(self.host, self.port, self.settings.proxy, limit)
        except hubpath.PathError as err:
            return ERROR, f"{err.text}: check the endpoint and /etc/resolv.conf", \
                EX_UNAVAILABLE
        return OK, f"{self.host} resolves to {hubpath.addresses(self.addresses)}", EX_OK

    def dps_tcp(self, limit: float):
        try:
            hubpath.open_tcp(self.host, self.port, self.settings.proxy, limit,
                             self.addresses).close()
        except hubpath.PathError as err:
            return ERROR, f"{err.text}: a firewall? DPS takes HTTPS on 443", EX_UNAVAILABLE
        return OK, f"connected to {self.where}", EX_OK

    def dps_tls(self, limit: float):
        with self._link(limit) as link:
            try:
                tls = hubpath.handshake(self.host, self.port, self.settings.proxy, link.ctx,
                                        limit, self.addresses)
            except ssl.SSLCertVerificationError as err:
                return ERROR, (f"the certificate of {self.where} does not verify against "
                               f"{link.trust}: {err.verify_message}"), EX_UNAVAILABLE
            except (hubpath.PathError, OSError) as err:
                return ERROR, f"{self.where}: TLS handshake failed: {err}", EX_UNAVAILABLE
            tls.close()
            return OK, f"{self.where}'s certificate verified against {link.trust}", EX_OK

    def dps_auth(self, limit: float):
        from .dpsclient import DpsError, query
        from .zerotouch import kept_enrollment

        record = self.record
        if record.get("attestation") != SYMMETRIC_KEY:
            return SKIPPED, ("X.509 attestation: the device certificate is not kept; run "
                             "'defender-setup provision' with it to register again"), EX_OK
        try:
            enrollment = kept_enrollment(self.root, record)
            if enrollment is None:
                return ERROR, "no device key is kept (dps-device-key)", EX_CONFIG
            with self._link(limit) as link:
                state = query(link, enrollment)
        except DpsError as err:
            return ERROR, str(err), err.exit_code
        except (SetupError, KeyError) as err:
            return ERROR, f"the DPS registration record cannot be used: {err}", EX_CONFIG
        said = f"DPS assigns {record['registration_id']} to {state.hub} as {state.device_id}"
        try:
            c = self.stored.loaded.connection_string
        except SetupError:
            return OK, said, EX_OK
        if (state.hub, state.device_id) != (c.host_name, c.device_id):
            return WARNING, (f"{said}, but the stored identity is {c.device_id} on "
                             f"{c.host_name}: the device was re-assigned; run 'defender-setup "
                             "provision' again (or 'defender-setup restart': when the old hub "
                             "refuses it, it registers again)"), EX_OK
        return OK, f"{said}, as stored", EX_OK


# the order they run in and are shown
CHECKS = {"dps-dns": _Context.dps_dns, "dps-tcp": _Context.dps_tcp, "dps-tls": _Context.dps_tls,
          "dps-auth": _Context.dps_auth}
