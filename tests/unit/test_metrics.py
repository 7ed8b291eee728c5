"""metrics.render: the exposition text from the status/check facts (pure)."""

import re

from defender_setup import metrics

CONNECTED = {"active": True, "status_text": "connected to hub1.azure-devices.net as dev1/"
             "DefenderIotMicroAgent", "summary": "active (running)"}


def facts(**changes):
    base = {"version": "0.1.0", "method": "certificate", "sealed": False,
            "origin": {"source": "credential", "time": "2026-01-02T03:04:05.000000Z",
                       "timestamp": 1767323045.0},
            "certificate_not_after": 1798761600.0, "service": CONNECTED,
            "verification": {"result": "healthy", "time": "2026-01-02T03:04:07.000000Z",
                             "timestamp": 1767323047.0},
            "rollbacks": 2,
            "checks": [{"id": "agent-dir-safe", "status": "ok", "message": "",
                        "description": "d", "exit_code": 0},
                       {"id": "credentials-warnings", "status": "warning",
                        "message": "expires in 3 days", "description": "d", "exit_code": 0}]}
    base.update(changes)
    return base


def samples(text: str) -> dict:
    """``{'name{labels}': value}`` of every sample line."""
    found = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_every_family_has_help_and_type_before_its_samples():
    text = metrics.render(facts())
    declared = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
        elif line.startswith("# TYPE "):
            assert line.split()[2] == name
            declared.add(name)
        else:
            assert re.match(r"[a-z_]+", line).group(0) in declared, line
    assert all(name.startswith("defender_setup_") for name in declared)
    assert text.endswith("\n")


def test_a_connected_certificate_device():
    got = samples(metrics.render(facts()))
    assert got['defender_setup_info{version="0.1.0",method="certificate",origin="credential"}'] \
        == 1
    assert got["defender_setup_configured"] == 1
    assert got["defender_setup_credentials_sealed"] == 0
    assert got["defender_setup_agent_active"] == got["defender_setup_agent_connected"] == 1
    assert got["defender_setup_last_change_timestamp_seconds"] == 1767323045.0
    assert got['defender_setup_last_change_result{result="verified"}'] == 1
    assert got["defender_setup_last_verification_timestamp_seconds"] == 1767323047.0
    assert got['defender_setup_last_verification_result{result="healthy"}'] == 1
    assert got['defender_setup_last_verification_result{result="failed"}'] == 0
    assert got["defender_setup_certificate_expiry_timestamp_seconds"] == 1798761600.0
    assert got["defender_setup_rollbacks_total"] == 2
    assert got['defender_setup_check_status{check="credentials-warnings",status="warning"}'] \
        == 1
    assert got['defender_setup_check_status{check="credentials-warnings",status="ok"}'] == 0


def test_each_check_is_one_state_set_whatever_its_id():
    checks = [{"id": f"new-check-{n}", "status": s} for n, s in
              enumerate(("ok", "warning", "error", "skipped"))]
    got = samples(metrics.render(facts(checks=checks)))
    for n, status in enumerate(("ok", "warning", "error", "skipped")):
        row = {s: got[f'defender_setup_check_status{{check="new-check-{n}",status="{s}"}}']
               for s in metrics.CHECK_STATUSES}
        assert row == {s: float(s == status) for s in metrics.CHECK_STATUSES}


def test_running_but_retrying_is_active_not_connected():
    got = samples(metrics.render(facts(service={
        "active": True, "status_text": "retrying: hub unreachable (DNS: no such name)"})))
    assert (got["defender_setup_agent_active"], got["defender_setup_agent_connected"]) == (1, 0)
    got = samples(metrics.render(facts(service={"active": False, "status_text":
                                                "connected to stale"})))
    assert (got["defender_setup_agent_active"], got["defender_setup_agent_connected"]) == (0, 0)


def test_an_unknown_service_state_is_left_out_not_guessed():
    """Another tree (--root) or no systemd: absent, not 0 (which would read as 'down')."""
    for service in (None, {"active": None, "summary": "not checked"}):
        text = metrics.render(facts(service=service))
        assert "agent_active" not in text and "agent_connected" not in text


def test_unconfigured():
    got = samples(metrics.render(facts(method=None, sealed=None, origin=None,
                                       certificate_not_after=None, verification=None,
                                       rollbacks=0, checks=[])))
    assert got['defender_setup_info{version="0.1.0",method="none",origin="none"}'] == 1
    assert got["defender_setup_configured"] == 0
    assert got["defender_setup_rollbacks_total"] == 0
    assert not any("timestamp" in name or "result" in name or "sealed" in name
                   for name in got)


def test_the_last_change_is_judged_by_the_verification_after_it():
    def change(origin_ts, verification):
        got = samples(metrics.render(facts(origin={"source": "apply", "timestamp": origin_ts},
                                           verification=verification)))
        return [r for r in metrics.CHANGES
                if got[f'defender_setup_last_change_result{{result="{r}"}}'] == 1]

    assert change(10.0, None) == ["unverified"]
    assert change(10.0, {"result": "healthy", "timestamp": 5.0}) == ["unverified"]
    assert change(10.0, {"result": "healthy", "timestamp": 11.0}) == ["verified"]
    # settle wrote the roll-back (origin "rollback") before its own record
    assert change(10.0, {"result": "rolled back", "timestamp": 11.0}) == ["rolled_back"]
    assert change(10.0, {"result": "unconfigured", "timestamp": 11.0}) == ["unconfigured"]
    assert change(10.0, {"result": "failed", "timestamp": 11.0}) == ["failed"]


def test_labels_come_from_fixed_sets_whatever_the_records_say():
    """Records are files: whatever they hold, no free text becomes a label (cardinality,
    and a path or a message could say more than it should)."""
    hostile = 'x"}\n/var/defender_iot_micro_agent/connection_string.txt SharedAccessKey=abc'
    text = metrics.render(facts(
        version=hostile, method=hostile, origin={"source": hostile, "timestamp": 1.0},
        verification={"result": hostile, "timestamp": 2.0}, rollbacks=hostile,
        checks=[{"id": hostile, "status": "ok"}, {"id": "good-id", "status": hostile}]))
    assert "SharedAccessKey" not in text and "/var/" not in text and 'x"' not in text
    got = samples(text)
    assert got['defender_setup_info{version="other",method="none",origin="other"}'] == 1
    assert got['defender_setup_last_verification_result{result="failed"}'] == 1
    assert got["defender_setup_rollbacks_total"] == 0
    assert got['defender_setup_check_status{check="good-id",status="error"}'] == 1
    labels = set(re.findall(r'(\w+)="', text))
    assert labels == {"version", "method", "origin", "result", "check", "status"}


def test_no_message_or_identity_reaches_the_text():
    text = metrics.render(facts())
    for word in ("expires in 3 days", "hub1", "dev1", "connected to"):
        assert word not in text.split("# HELP")[0] and all(
            word not in line for line in text.splitlines() if not line.startswith("#"))


def test_many_checks_are_capped():
    checks = [{"id": f"c-{n}", "status": "ok"} for n in range(500)]
    got = samples(metrics.render(facts(checks=checks)))
    assert sum(name.startswith("defender_setup_check_status") for name in got) == \
        metrics.MAX_CHECKS * len(metrics.CHECK_STATUSES)
