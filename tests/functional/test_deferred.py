"""The agent, connected, has not loaded what defender_setup.agent.deferred defers, nor the
IDNA codec: a fresh interpreter imports the agent as ``python3 -m defender_setup.agent``
does, connects to the SAS test hub with the hub connector, then lists what it loaded."""

import subprocess
import sys

import pytest

from defender_setup.agent.deferred import AGENT
from tests.hubroot import configure, sas_text, store, validated
from tests.nobody import ENV, REPO

CHILD = """
import defender_setup.agent.__main__  # first, as python3 -m runs it: the deferrals
import sys, threading
from pathlib import Path
from defender_setup.agent.deferred import AGENT, _Deferred
from defender_setup.agent.hub import HubConnector
from defender_setup.agent.runtime import load_credentials

class Notify:
    def __init__(self):
        self.connected = threading.Event()
    def status(self, text):
        if text.startswith("connected to "):
            self.connected.set()
    def log(self, line, level=6):
        pass
    def fail(self, code, line):
        sys.exit(f"failed: {line}")

root = Path(sys.argv[1])
notify, connector = Notify(), HubConnector(root)
connector.start(load_credentials(root), notify)
assert notify.connected.wait(20), "not connected"
connector.stop()
loaded = [name for name in AGENT + ("encodings.idna",)
          if name in sys.modules and not isinstance(sys.modules[name], _Deferred)]
print(" ".join(loaded) or "none")
"""


@pytest.mark.allow_subprocess("python3")
def test_a_connected_agent_loaded_none_of_the_deferred_modules(hub_pki, sas_broker, root):
    configure(root, hub_pki, port=sas_broker.port)
    store(root, validated(sas_text()))
    r = subprocess.run([sys.executable, "-c", CHILD, str(root)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "none\n", "")
    assert len(sas_broker.connections) == 1 and AGENT
