"""Agent settings read by an unprivileged process (root reads any file)."""

import shutil
import sys

import pytest

from tests.nobody import run_as_nobody, shared_tmpdir

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.mark.allow_subprocess("setpriv", "python3")
def test_unreadable_ca_file():
    top = shared_tmpdir()  # root reads any file: the parse runs as nobody
    try:
        ca = top / "ca.pem"
        ca.write_bytes(PEM)
        ca.chmod(0)
        code = ("from pathlib import Path\n"
                "from defender_setup.agent.settings import SettingsError, parse\n"
                "try:\n"
                f"    parse('{{\"ca_file\": \"/ca.pem\"}}', root=Path('{top}'))\n"
                "except SettingsError as err:\n"
                "    print(err)\n")
        r = run_as_nobody([sys.executable, "-c", code])
    finally:
        shutil.rmtree(top)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "conf.json: ca_file: cannot read /ca.pem: permission denied; the agent runs "
           "unprivileged: make the CA file (and its directory) readable by all, e.g. chmod "
           "0644\n", "")
