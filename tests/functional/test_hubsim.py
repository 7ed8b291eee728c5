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


def test_twins_merge_patches_as_iot_hub_does():
    from tests.hubsim.twin import Twins, answer_topic

    twins, who = Twins(), ("dev", "mod")
    assert twins.patch(who, b'{"a": {"b": 1, "c": 2}, "d": 3}') == (204, 2)
    assert twins.patch(who, b'{"a": {"b": null}, "d": null}') == (204, 3)
    assert twins.reported[who] == {"$version": 3, "a": {"c": 2}}
    for bad in (b"[1]", b"not json", b'{"a.b": 1}', b'{"$x": 1}', b'{"a": {"b c": 1}}'):
        assert twins.patch(who, bad) == (400, None)
    assert twins.reported[who]["$version"] == 3
    assert answer_topic("$iothub/twin/PATCH/properties/reported/?$rid=7", 204, 3) == (
        "$iothub/twin/res/204/?$rid=7&$version=3")
