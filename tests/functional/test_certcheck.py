"""defender_setup.agent.certcheck: the certificate checks in a forked child, same verdicts."""

import subprocess
import sys
import time

import pytest

from defender_setup import certificates
from defender_setup.agent import certcheck
from defender_setup.errors import SetupError, ValidationError
from tests import certfactory
from tests.nobody import ENV, REPO

pytestmark = pytest.mark.allow_subprocess("fork")


def test_the_child_gives_what_the_checks_give(cert_inputs):
    cert, key = cert_inputs.certificate, cert_inputs.private_key
    assert certcheck.check(cert, key, device_id="dev1") == \
        certificates.check(cert, key, device_id="dev1")
    other = certfactory.make_identity("dev1", key=certfactory.private_key("p256", 5))
    with pytest.raises(ValidationError) as here:
        certificates.check(cert, other.key_pem)
    with pytest.raises(ValidationError) as there:
        certcheck.check(cert, other.key_pem)
    assert (there.value.field, there.value.message) == (here.value.field, here.value.message)


def test_a_child_that_does_not_answer_is_killed(cert_inputs, monkeypatch):
    monkeypatch.setattr(certcheck, "TIMEOUT", 0.5)
    monkeypatch.setattr(certificates, "check", lambda *a, **kw: time.sleep(60))
    started = time.monotonic()
    with pytest.raises(SetupError, match="did not finish within 0.5 s"):
        certcheck.check(cert_inputs.certificate, cert_inputs.private_key)
    assert time.monotonic() - started < 5


@pytest.mark.allow_subprocess("python3", "fork")
def test_cryptography_never_loads_into_the_calling_process(cert_inputs, tmp_path):
    (tmp_path / "c.pem").write_bytes(cert_inputs.certificate)
    (tmp_path / "k.pem").write_bytes(cert_inputs.private_key)
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from defender_setup.agent import certcheck\n"
            f"info = certcheck.check(Path('{tmp_path}/c.pem').read_bytes(),\n"
            f"                       Path('{tmp_path}/k.pem').read_bytes())\n"
            "print(info.common_name, 'cryptography' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "dev1 False\n", "")
