"""The test hub's own log (``python3 -m tests.hubsim``, what ``make demo`` shows): each CONNECT
line gives the reason of that CONNECT, not of the latest one."""

import base64
import time

from defender_setup.agent import hub, settings
from tests.hubsim.__main__ import connect_line
from tests.hubsim.broker import Broker
from tests.hubsim.sasauth import SasAuth

KEY = base64.b64encode(b"k" * 32).decode()
WRONG = base64.b64encode(b"w" * 32).decode()


def test_refusal_then_acceptance_each_logged_with_its_own_reason(hub_pki):
    pki = hub_pki
    auth = SasAuth("localhost", {("dev-1", "DefenderIotMicroAgent"): KEY})
    broker = Broker(auth=auth, tls=(pki.server_cert, pki.server_key))
    broker.start()
    try:
        conf = settings.Settings(ca_file=pki.ca_file, port=broker.port)
        for key in (WRONG, KEY):  # a wrong key, then the roll-back to the right one
            ident = hub.Identity("localhost", "dev-1", "DefenderIotMicroAgent", None, key)
            link = hub.hubnet.Link(ident, conf)
            token = hub.sas.new_token(ident.resource, key, 60, now=time.time())
            link.open(token, time.time, timeout=5).close()
        assert broker.wait_for(lambda: len(broker.connections) == 2)
    finally:
        broker.stop()
    lines = [connect_line(conn) for conn in broker.connections]  # printed after both
    assert lines[0].endswith("CONNECT dev-1/DefenderIotMicroAgent -> CONNACK 5 "
                             "(signature mismatch)")
    assert lines[1].endswith("CONNECT dev-1/DefenderIotMicroAgent -> CONNACK 0 (accepted)")
