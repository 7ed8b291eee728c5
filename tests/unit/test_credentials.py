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


def test_the_method_comes_from_the_files_present(sas_inputs, cert_inputs):
    files = stored(cert_inputs)
    del files[credentials.CERTIFICATE_FILE]  # the key alone still says "certificate"
    with pytest.raises(ValidationError) as err:
        credentials.load(files)
    assert err.value.field == "certificate"
    files = {**stored(sas_inputs), credentials.PRIVATE_KEY_FILE: cert_inputs.private_key}
    with pytest.raises(ValidationError) as err:  # a SAS string with a key file: certificate
        credentials.load(files)
    assert err.value.field == "SharedAccessKey"
