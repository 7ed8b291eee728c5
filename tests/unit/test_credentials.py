"""defender_setup.credentials: a stored set read back with load (validate is exercised by
test_connection_string, test_certificates and the command line's tests)."""

import pytest

from defender_setup import credentials
from defender_setup.errors import EX_CONFIG, NotConfigured, ValidationError


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
