"""msagent.forget_stale_cache: Microsoft's settings cache goes when conf.json changed."""

from __future__ import annotations

import io

from defender_setup.agentdir import AgentDir
from defender_setup.msagent import forget_stale_cache
from defender_setup.target import MICROSOFT_PACKAGE, OURS, Target

MS = Target(MICROSOFT_PACKAGE, "4.1.2")


def make(tmp_path, target=MS):
    agent = AgentDir(tmp_path, target)
    agent.path.mkdir(parents=True, mode=0o700)
    cache = tmp_path / "var/lib/defender_iot_micro_agent/cache.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{}")
    return agent, cache


def test_cache_deleted_once_per_conf_change(tmp_path):
    agent, cache = make(tmp_path)
    out = io.StringIO()
    assert forget_stale_cache(agent, out)  # never seen: the cache may be from any conf.json
    assert not cache.exists() and "conf.json changed" in out.getvalue()
    cache.write_text("{}")
    assert not forget_stale_cache(agent, io.StringIO())  # unchanged: the cache stays
    assert cache.exists()
    (agent.path / "conf.json").write_text('{"IothubModule_TransportProtocol": "AMQP_Protocol"}')
    assert forget_stale_cache(agent, io.StringIO())
    assert not cache.exists()


def test_our_runtime_has_no_cache_and_nothing_is_touched(tmp_path):
    agent, cache = make(tmp_path, OURS)
    assert not forget_stale_cache(agent, io.StringIO())
    assert cache.exists() and not agent.state.exists()
