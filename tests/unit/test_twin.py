"""defender_setup.agent.twin: the reported properties' body and when PATCHes go out."""

import datetime
import json
from types import SimpleNamespace

import pytest

from defender_setup.agent import twin

pytestmark = pytest.mark.hub


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(bodies, interval=10.0, **kw):
    """A Twin over a list whose last item is the current body; (twin, clock, log lines)."""
    clock, lines = Clock(), []
    t = twin.Twin(lambda: bodies[-1], interval, clock=clock, check_every=0.0,
                  log=lambda line, level: lines.append(line), **kw)
    return t, clock, lines


def rid(topic):
    return topic.rpartition("$rid=")[2]


def test_a_patch_on_connect_then_only_on_change_and_never_faster_than_the_interval():
    bodies = [b'{"a":1}']
    t, clock, _ = make(bodies)
    t.connected()
    topic, body = t.due()
    assert topic == "$iothub/twin/PATCH/properties/reported/?$rid=1" and body == b'{"a":1}'
    t.answer(f"$iothub/twin/res/204/?$rid={rid(topic)}&$version=2")
    clock.now += 60
    assert t.due() is None  # unchanged
    for n in range(2, 6):  # changes within one interval: coalesced
        bodies.append(b'{"a":%d}' % n)
        topic, body = t.due() or (None, None)
        if n == 2:
            assert body == b'{"a":2}'
            t.answer(f"$iothub/twin/res/204/?$rid={rid(topic)}&$version=3")
        else:
            assert body is None
        clock.now += 1
    clock.now += 10
    topic, body = t.due()
    assert body == b'{"a":5}'  # the latest only
    assert t.sent == 3


def test_every_new_connection_reports_again_within_the_rate_limit():
    t, clock, _ = make([b"{}"])
    t.connected()
    topic, _ = t.due()
    t.answer(f"$iothub/twin/res/204/?$rid={rid(topic)}")
    t.connected()  # a reconnect at once: wait for the interval
    assert t.due() is None
    clock.now += 10
    assert t.due() is not None


def test_an_error_or_no_answer_backs_off_and_says_so_once():
    t, clock, lines = make([b"{}"])  # an answer is awaited ANSWER_WITHIN (30) seconds
    t.connected()
    topic, _ = t.due()
    t.answer(f"$iothub/twin/res/500/?$rid={rid(topic)}")
    assert t.due() is None
    clock.now += 19.9  # 2 x the interval after the failed PATCH
    assert t.due() is None
    clock.now += 0.2
    topic, _ = t.due()
    assert t.due() is None  # one at a time
    clock.now += 30  # no answer at all: a failure too
    assert t.due() is None  # now 4 x the interval
    clock.now += 40
    assert t.due() is not None
    warnings = [line for line in lines if "trying again" in line]
    assert warnings[0].startswith("twin: the hub answered 500 to the reported properties")
    assert warnings[1].startswith("twin: no answer within 30 s")
    assert len(warnings) == 2


def test_answers_to_other_requests_or_malformed_are_ignored():
    t, clock, _ = make([b"{}"])
    t.connected()
    t.due()
    for topic in ("$iothub/twin/res/204/?$rid=99", "$iothub/twin/res/204", "junk",
                  "$iothub/twin/res/2x4/?$rid=1", "$iothub/twin/res/204/?$rid"):
        t.answer(topic)
    assert t.acked == 0
    t.answer("$iothub/twin/res/204/?$version=7&$rid=1")
    assert t.acked == 1


def test_a_body_over_the_bound_is_never_sent():
    def build():
        return twin.encode({"x": "y" * twin.MAX_BODY})

    lines = []
    t = twin.Twin(build, 1.0, clock=Clock(), log=lambda line, level: lines.append(line))
    t.connected()
    assert t.due() is None
    assert len(lines) == 1 and "over the 4096-byte bound" in lines[0]


def creds(method="certificate", sources=None):
    cert = SimpleNamespace(not_after=datetime.datetime(2027, 3, 4, 5, 6, 7,
                                                       tzinfo=datetime.timezone.utc))
    return SimpleNamespace(method=method, certificate=cert if method == "certificate" else None,
                           sources=sources or {})


def test_the_body_names_every_field_and_the_worst_case_fits(tmp_path):
    (tmp_path / "etc").mkdir()
    long = "x" * 500
    (tmp_path / "etc/os-release").write_text(
        f'ID={long}\nVERSION_ID="{long}"\nPRETTY_NAME="{long}\x1b[31m"\n')
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: other\nStatus: install ok installed\nVersion: 9\n\n"
                      "Package: defender-setup\nStatus: install ok installed\n"
                      f"Version: 0.1.0-1{'9' * 50}\n")
    sealed = {"connection_string.txt": tmp_path / "connection_string.txt.cred"}
    report = twin.Report(creds(sources=sealed), tmp_path)
    props = json.loads(report.body())["defenderSetup"]
    assert set(props) == {"schemaVersion", "packageVersion", "agentVersion", "method",
                          "origin", "certificate", "sealed", "lastChange",
                          "lastVerification", "osRelease"}
    assert props["certificate"] == {"notAfter": "2027-03-04T05:06:07Z"}
    assert props["sealed"] is True and props["packageVersion"].startswith("0.1.0-1")
    assert props["origin"] is None and props["lastChange"] is None  # known as unknown
    assert len(props["osRelease"]["prettyName"]) == 64
    assert "\x1b" not in props["osRelease"]["prettyName"]
    # the largest body the fields allow (every free value at its bound) is well inside 4 KiB
    worst = dict(props, origin="drop-folder",
                 lastChange={"time": "2026-01-01T00:00:00.000000Z", "origin": "drop-folder",
                             "result": "rolled-back"},
                 lastVerification={"time": "2026-01-01T00:00:00.000000Z",
                                   "result": "unconfigured"})
    assert len(twin.encode(worst)) < twin.MAX_BODY // 2


def test_a_shared_access_key_set_reports_no_certificate_and_not_sealed(tmp_path):
    props = json.loads(twin.Report(creds("connection-string"), tmp_path).body())["defenderSetup"]
    assert props["certificate"] is None and props["sealed"] is False
    assert props["packageVersion"] is None  # not installed: no dpkg status
    assert props["osRelease"] == {"id": None, "versionId": None, "prettyName": None}


def test_the_package_version_during_the_dpkg_run_comes_from_its_journal(tmp_path):
    dpkg = tmp_path / "var/lib/dpkg"
    (dpkg / "updates").mkdir(parents=True)
    (dpkg / "status").write_text("Package: defender-setup\nStatus: install ok installed\n"
                                 "Version: 0.0.9-1\n")
    assert twin.package_version(tmp_path) == "0.0.9-1"
    # an upgrade in progress: the new version unpacked, its postinst running
    (dpkg / "updates/0001").write_text("Package: defender-setup\nStatus: install ok "
                                       "half-configured\nVersion: 0.1.0-1\n")
    assert twin.package_version(tmp_path) == "0.1.0-1"
    (dpkg / "updates/0002").write_text("Package: defender-setup\nStatus: purge ok "
                                       "not-installed\n")
    assert twin.package_version(tmp_path) is None
