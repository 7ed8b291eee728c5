"""defender_setup.checks: the local checks on a throw-away root, the clock passed in."""

import datetime as dt

import pytest

from defender_setup import checks
from defender_setup.agentdir import AgentDir
from defender_setup.certificates import validity
from defender_setup.credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE
from defender_setup.errors import EX_CONFIG, EX_OK
from tests import certfactory
from tests.conftest import DEVICE, HUB, MODULE


def expiry(root, clock=None):
    kw = {"clock": clock} if clock is not None else {}
    (result,) = [r for r in checks.run_checks(root, **kw) if r.id == "certificate-expiry"]
    return result


def not_after(inputs):
    return validity(inputs.certificate)[1]


def at(when: dt.datetime):
    return lambda: when.timestamp()


@pytest.mark.parametrize("left,status,code,says", [
    (dt.timedelta(days=200), "ok", EX_OK, "the certificate expires in 200 days ("),
    (dt.timedelta(days=30, seconds=1), "ok", EX_OK, "expires in 30 days"),
    (dt.timedelta(days=29, hours=23), "warning", EX_OK, "expires in 29 days"),
    (dt.timedelta(days=7, seconds=1), "warning", EX_OK, "expires in 7 days"),
    (dt.timedelta(days=6, hours=23), "error", EX_CONFIG, "expires in 6 days"),
    (dt.timedelta(days=1), "error", EX_CONFIG, "expires in 1 day ("),
    (dt.timedelta(hours=3), "error", EX_CONFIG, "expires in less than a day"),
    (dt.timedelta(0), "error", EX_CONFIG, "the certificate expired "),
    (-dt.timedelta(days=3), "error", EX_CONFIG, "the certificate expired "),
], ids=["200d", "30d+1s", "29d23h", "7d+1s", "6d23h", "1d", "3h", "0", "expired"])
def test_certificate_expiry_warns_under_30_days_and_fails_under_7(root, cert_inputs, left,
                                                                  status, code, says):
    AgentDir(root).write(cert_inputs.validated().files)
    end = not_after(cert_inputs)
    result = expiry(root, at(end - left))
    assert (result.status, result.exit_code) == (status, code), result
    assert says in result.message and end.strftime("%Y-%m-%d %H:%M UTC") in result.message
    if status != "ok":
        assert "defender-setup apply --certificate" in result.message


def store_certificate(root, ident) -> None:
    """The certificate method's set for ``ident``, written as it is, valid or not."""
    text = f"HostName={HUB};DeviceId={DEVICE};ModuleId={MODULE};x509=true\n".encode()
    AgentDir(root).write({CONNECTION_STRING_FILE: (text, 0o600),
                          CERTIFICATE_FILE: (ident.cert_pem, 0o644),
                          PRIVATE_KEY_FILE: (ident.key_pem, 0o600)})


def test_certificate_expiry_names_a_stored_certificate_that_has_expired(root):
    # validation refuses it (credentials-valid), and the expiry check still says when it ended
    now = dt.datetime.now(dt.timezone.utc)
    ident = certfactory.make_identity(cn=DEVICE, key="p256", not_before=now - dt.timedelta(10),
                                      not_after=now - dt.timedelta(days=2))
    store_certificate(root, ident)
    results = {r.id: r for r in checks.run_checks(root)}
    assert results["credentials-valid"].status == "error"
    assert results["certificate-expiry"].status == "error"
    assert results["certificate-expiry"].message.startswith("the certificate expired ")


def test_certificate_expiry_is_skipped_for_the_connection_string_method(root, sas_inputs):
    AgentDir(root).write(sas_inputs.validated().files)
    result = expiry(root)
    assert (result.status, result.message) == (
        "skipped", "the connection-string method uses no certificate")


def test_certificate_expiry_is_skipped_when_not_configured(root):
    result = expiry(root)
    assert (result.status, result.message) == ("skipped", "needs credentials-present")


def test_an_expiring_certificate_is_reported_once_by_certificate_expiry(root):
    """credentials-warnings keeps the other warnings (here the CN), not the expiry."""
    ident = certfactory.make_identity(cn="someone-else", key="p256", days=10)
    store_certificate(root, ident)
    results = {r.id: r for r in checks.run_checks(root)}
    assert results["certificate-expiry"].status == "warning"
    assert "expires in 9 days" in results["certificate-expiry"].message
    warnings = results["credentials-warnings"]
    assert warnings.status == "warning" and "CN is 'someone-else'" in warnings.message
    assert "expires" not in warnings.message, warnings
