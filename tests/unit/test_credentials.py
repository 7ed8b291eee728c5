"""defender_setup.credentials: a stored set read back with load (validate is exercised by
test_connection_string, test_certificates and the command line's tests)."""

from pathlib import Path

import pytest

from defender_setup import certificates, credentials
from defender_setup.errors import (
    CERTIFICATE,
    CONNECTION_STRING,
    EX_CONFIG,
    PRIVATE_KEY,
    NotConfigured,
    ValidationError,
)
from defender_setup.inputs import LIMITS


def stored(inputs) -> dict:
    """The files as AgentDir.current() gives them back."""
    return {name: data for name, (data, _) in inputs.validated().files.items()}


def test_a_stored_set_loads_as_it_validated(sas_inputs, cert_inputs):
    for inputs in (sas_inputs, cert_inputs):
        loaded = credentials.load(stored(inputs))
        assert loaded == inputs.validated()
        assert loaded.method == inputs.method


def test_no_connection_string_is_not_configured(cert_inputs, tmp_path):
    files = stored(cert_inputs)
    del files[credentials.CONNECTION_STRING_FILE]
    for present in ({}, files):
        with pytest.raises(NotConfigured) as err:
            credentials.load(present, tmp_path)
        assert err.value.exit_code == EX_CONFIG
        assert str(err.value) == (f"not configured: no connection_string.txt in {tmp_path}; "
                                  "configure with 'dpkg-reconfigure defender-setup' or "
                                  "'defender-setup apply'")


def test_the_method_comes_from_the_connection_string(sas_inputs, cert_inputs):
    files = stored(cert_inputs)
    del files[credentials.CERTIFICATE_FILE]  # x509=true says "certificate": one is missing
    with pytest.raises(ValidationError) as err:
        credentials.load(files)
    assert err.value.label == "certificate"
    files = {**stored(sas_inputs), credentials.PRIVATE_KEY_FILE: cert_inputs.private_key}
    # A SharedAccessKey string decides, whatever other files lie beside it.
    assert credentials.method_of(files) == "connection-string"
    assert credentials.load(files).method == "connection-string"


def test_a_device_id_holding_x509_is_still_a_sas_string(sas_inputs):
    text = sas_inputs.connection_string.replace(b"DeviceId=", b"DeviceId=x509=true")
    assert credentials.method_of({credentials.CONNECTION_STRING_FILE: text}) == \
        "connection-string"


# --- what systemd hands the unit ----------------------------------------------------------------

UNIT_FILE = (Path(__file__).resolve().parents[2]
             / "debian/defender-setup-agent.defender-iot-micro-agent.service")
PAGE = 4096
SYSTEMD_CREDENTIALS_MAX = 1024 * 1024  # CREDENTIALS_TOTAL_SIZE_MAX, systemd 247, 252, 257


def systemd_charge(loaded: dict) -> int:
    """What the unit's credentials cost systemd, ``loaded`` (ID -> size) and the unit's
    ``SetCredential=`` stand-ins for the rest; the larger of what was measured in booted
    containers: 247 and 252 count each credential's ID length plus its size, 247 every
    ``SetCredential=`` too (loaded or not); 257 keeps them on a 1 MiB tmpfs, whole 4 KiB
    pages per file."""
    stand_ins = dict(line.split("=", 1)[1].split(":", 1) for line in
                     UNIT_FILE.read_text().splitlines() if line.startswith("SetCredential="))
    assert set(loaded) <= set(stand_ins)
    by_bytes = (sum(len(i) + size for i, size in loaded.items())
                + sum(len(i) + len(value) for i, value in stand_ins.items()))
    by_pages = (sum(-(-size // PAGE) * PAGE for size in loaded.values())
                + PAGE * len(set(stand_ins) - set(loaded)))
    return max(by_bytes, by_pages)


def test_the_largest_set_fits_what_systemd_hands_the_unit(dev_chain_growth):
    """Every field at its limit (the certificate and key as re-encoded for the agent), with
    conf.json at the most the agent reads: systemd still starts the unit, plain or sealed."""
    from defender_setup.agent.settings import MAX_CONF_BYTES

    cert = LIMITS[CERTIFICATE] + LIMITS[CERTIFICATE] // dev_chain_growth
    key = LIMITS[PRIVATE_KEY] + LIMITS[PRIVATE_KEY] // dev_chain_growth
    text = LIMITS[CONNECTION_STRING] + 1  # the canonical form and its newline
    for sealed in ("", ".cred"):
        loaded = {"connection_string.txt": text, "certificate_public.pem": cert,
                  "certificate_private.pem" + sealed: key, "conf.json": MAX_CONF_BYTES}
        assert systemd_charge(loaded) <= SYSTEMD_CREDENTIALS_MAX
        loaded = {"connection_string.txt" + sealed: text, "conf.json": MAX_CONF_BYTES}
        assert systemd_charge(loaded) <= SYSTEMD_CREDENTIALS_MAX
    # what the attack pass handed systemd: a 1 MiB chain, with a key and a connection string
    assert systemd_charge({"connection_string.txt": 100, "certificate_public.pem": 1 << 20,
                           "certificate_private.pem": 250}) > SYSTEMD_CREDENTIALS_MAX


@pytest.fixture
def dev_chain_growth():
    """1/N: at most how much re-encoding (64 columns, LF) adds to a chain given squashed on one
    line per block, the most compact PEM a person can give."""
    from tests import certfactory

    ident = certfactory.make_identity(cn="dev1", key="p256")
    squashed = b"".join(line for line in ident.cert_pem.splitlines()) * 3
    written = certificates.normalize_certificate(squashed)
    growth = 16
    assert (len(written) - len(squashed)) * growth < len(squashed)
    return growth


def test_validate_refuses_a_chain_of_copies(cert_inputs):
    with pytest.raises(ValidationError) as err:
        credentials.validate("certificate", cert_inputs.connection_string,
                             cert_inputs.certificate * 2, cert_inputs.private_key)
    assert err.value.field == CERTIFICATE and "certificate 2 is a copy of certificate 1" in str(
        err.value)
    with pytest.raises(ValidationError) as err:
        credentials.validate("certificate", cert_inputs.connection_string,
                             cert_inputs.certificate * 2000, cert_inputs.private_key)
    assert err.value.field == CERTIFICATE and "at most 768 KiB" in str(err.value)
