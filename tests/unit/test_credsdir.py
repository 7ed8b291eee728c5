"""defender_setup.agent.credsdir and the agent's reading of ``$CREDENTIALS_DIRECTORY``.

A directory laid out as systemd lays it out for the unit: every ID the unit lists, holding the
file's content (decrypted, for a sealed ``.cred``) or the unit's ``SetCredential=`` stand-in
``absent``. No agent directory exists: the agent must not need it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from defender_setup.agent import credsdir, settings
from defender_setup.agent.hub import Identity
from defender_setup.agent.runtime import load_credentials
from defender_setup.errors import SetupError
from tests.fakes import IDS, handed_over

REPO = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO / "debian" / "defender-setup-agent.defender-iot-micro-agent.service"
GENERATOR = REPO / "debian" / "generator" / "defender-setup-generator"  # the sealed files



def test_the_unit_lists_every_id_with_a_stand_in():
    unit, generated = UNIT_FILE.read_text(), GENERATOR.read_text()
    for name in IDS:
        assert f"SetCredential={name}:{credsdir.ABSENT.decode()}\n" in unit
        loaded = f"LoadCredentialEncrypted={name}:$agent/" in generated if name.endswith(
            ".cred") else f"LoadCredential={name}:/" in unit
        assert loaded, name


def test_read_tells_absent_from_present(tmp_path):
    d = handed_over(tmp_path / "c", conf_json=b"{}")
    assert credsdir.read(d, "conf.json") == b"{}"
    assert credsdir.read(d, "connection_string.txt") is None
    assert credsdir.read(d, "not-listed") is None
    (d / "big").write_bytes(b"x" * 11)
    with pytest.raises(ValueError):
        credsdir.read(d, "big", limit=10)
    assert credsdir.directory({"CREDENTIALS_DIRECTORY": str(d)}) == d
    assert credsdir.directory({}) is None


def test_plain_and_sealed_connection_strings_load_alike(tmp_path, sas_inputs):
    text = sas_inputs.validated().files["connection_string.txt"][0]
    for name in ("connection_string_txt", "connection_string_txt_cred"):
        d = handed_over(tmp_path / name, **{name: text})
        creds = load_credentials(tmp_path / "no-root", d)
        assert creds.method == "connection-string"
        assert creds.connection_string.device_id == "dev1"


def test_certificate_files_are_used_where_systemd_put_them(tmp_path, cert_inputs):
    files = cert_inputs.validated().files
    d = handed_over(tmp_path / "c", connection_string_txt=files["connection_string.txt"][0],
                    certificate_public_pem=files["certificate_public.pem"][0],
                    certificate_private_pem_cred=files["certificate_private.pem"][0])
    creds = load_credentials(tmp_path / "no-root", d)
    ident = Identity.from_credentials(creds, tmp_path / "no-root")
    assert ident.cert_file == d / "certificate_public.pem"
    assert ident.key_file == d / "certificate_private.pem.cred"


def test_nothing_handed_over_is_not_configured(tmp_path):
    with pytest.raises(SetupError, match="not configured: no connection_string.txt in the "
                       "service's credentials"):
        load_credentials(tmp_path, handed_over(tmp_path / "c"))


def test_conf_json_comes_from_the_credentials(tmp_path):
    d = handed_over(tmp_path / "c", conf_json=b'{"transport": "websocket"}')
    assert settings.load(tmp_path, d).transport == "websocket"
    assert settings.load(tmp_path, handed_over(tmp_path / "none")) == settings.Settings()
    bad = handed_over(tmp_path / "bad", conf_json=b'{"transprot": 1}')
    with pytest.raises(settings.SettingsError, match=r"^\S*/etc/defender_iot_micro_agent/"
                                                     r"conf\.json: unknown setting"):
        settings.load(tmp_path, bad)
