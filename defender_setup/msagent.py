"""Microsoft's micro agent: its settings cache, deleted before a restart when ``conf.json``
changed.

Interface::

    forget_stale_cache(agent, out)   # agent: AgentDir; a writer, under the writers' lock

Microsoft documents that its agent keeps the settings it last read in
``/var/lib/defender_iot_micro_agent/cache.json`` and that the file must be deleted after
``conf.json`` changed, before the restart. :func:`verify.settle` (every restart of ours) calls
this first: a digest of the ``conf.json`` last seen is kept in our private state, and the
cache goes when the file differs from it (or was never seen). Our own runtime keeps no such
cache (``agent.target.cache`` is None): nothing happens.
"""

from __future__ import annotations

import hashlib

from .errors import WriteError
from .safefs import lstat

CONF = "conf.json"            # in the directory Microsoft's agent reads
RECORD = "conf-digest.json"   # in our private state: the conf.json the cache was built from
CONF_LIMIT = 64 * 1024        # a settings file is a few hundred bytes


def _digest(path) -> str:
    st = lstat(path)
    if st is None:
        return "absent"
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read(CONF_LIMIT + 1)).hexdigest()
    except OSError:
        return "unreadable"


def forget_stale_cache(agent, out) -> bool:
    """Delete Microsoft's settings cache when ``conf.json`` changed since the last restart;
    return whether it was deleted."""
    if agent.target.cache is None:
        return False
    digest = _digest(agent.path / CONF)
    seen = agent.record(RECORD)
    if seen is not None and seen.get("digest") == digest:
        return False
    cache = agent.root / agent.target.cache
    deleted = False
    try:
        cache.unlink()
        deleted = True
        print(f"deleted /{agent.target.cache}: {CONF} changed, the agent reads it again",
              file=out)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise WriteError(f"cannot delete /{agent.target.cache} ({exc.strerror}); delete it "
                         "and restart the agent, or its old settings stay in use") from None
    agent.save_record(RECORD, {"digest": digest})
    return deleted
