"""Modules the agent's dependencies import at start-up but, on the agent's paths, never use.

Interface::

    defer("inspect", "uuid", ...)   # call before anything imports them (agent/__main__.py)

A deferred module is a stand-in in ``sys.modules``: ``import inspect`` binds the stand-in, and
the first attribute looked up on it imports the real module (which then replaces the stand-in
in ``sys.modules``) and answers from it. Code that does use the module works as before; only
the moment of the import changes. (``importlib.util.LazyLoader`` cannot do this: the import
statement itself reads the lazy module's ``__spec__``, which loads it at once.) A module that
is not installed, or already imported, is left alone.

What each one costs the agent's resident memory, measured on Debian 12 (``tools/bench-hub``):

- ``inspect`` (1.4 MB with ``ast``, ``dis`` and ``tokenize``): ``dataclasses`` imports it to
  write a signature into the docstring of a class that has none; every dataclass the agent
  loads has one (``tests/functional/test_deferred.py`` checks that it stays deferred);
- ``uuid`` (0.2 MB): paho makes a client id from it when it is given none, and the key of a
  WebSocket upgrade; the agent always gives the id (so only a WebSocket connection loads it);
- ``ipaddress`` (0.3 MB): ``urllib.parse`` imports it to check IPv6 literals in URLs; the
  agent only parses a proxy's URL;
- ``traceback`` (0.3 MB with ``linecache``): used for the one line a bug is reported with;
- ``socks`` (PySocks, 0.1 MB): paho imports it when installed; the agent imports it itself
  when conf.json names a proxy.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

AGENT = ("inspect", "uuid", "ipaddress", "traceback", "socks")


class _Deferred(types.ModuleType):
    def __getattr__(self, attr):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def defer(*names: str) -> None:
    for name in names:
        if name not in sys.modules and importlib.util.find_spec(name) is not None:
            sys.modules[name] = _Deferred(name)
