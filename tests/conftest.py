"""Shared test setup.

Like cloud-init's tests, unit and functional tests may not start processes by accident: an
autouse fixture makes every process start fail unless the test names the program it runs::

    @pytest.mark.allow_subprocess("systemctl", "python3")
    @pytest.mark.allow_subprocess("fork")      # os.fork() itself

The refusal is a :class:`SubprocessForbidden`, a ``BaseException``: code under test that
catches ``Exception`` (to turn an ``OSError`` into a one-line message, say) cannot swallow it.
Integration tests, which exist to run real things, are exempt as a whole.
"""

import os
import subprocess

import pytest


class SubprocessForbidden(BaseException):
    """A test started a program it did not name in ``allow_subprocess``."""


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_subprocess(*programs): the test may start these "
                            "programs (by base name; 'fork' for os.fork)")


def _program(args, executable) -> str:
    first = executable or (args if isinstance(args, (str, bytes, os.PathLike)) else args[0])
    return os.path.basename(os.fsdecode(first))


@pytest.fixture(autouse=True)
def _no_subprocess(request, monkeypatch):
    if "integration" in request.node.nodeid.split("/"):
        return
    allowed = set()
    for marker in request.node.iter_markers("allow_subprocess"):
        if not marker.args:
            raise pytest.UsageError(f"{request.node.nodeid}: allow_subprocess needs the "
                                    "programs it allows, e.g. allow_subprocess('systemctl')")
        allowed.update(marker.args)
    execute_child, fork = subprocess.Popen._execute_child, os.fork

    def refuse(program):
        raise SubprocessForbidden(f"the test started {program!r}; name it: "
                                  f"@pytest.mark.allow_subprocess({program!r})")

    def guarded_child(self, args, executable, *rest, **kwargs):
        program = _program(args, executable)
        if program not in allowed:
            refuse(program)
        return execute_child(self, args, executable, *rest, **kwargs)

    def guarded_fork():
        if "fork" not in allowed:
            refuse("fork")
        return fork()

    monkeypatch.setattr(subprocess.Popen, "_execute_child", guarded_child)
    monkeypatch.setattr(os, "fork", guarded_fork)
