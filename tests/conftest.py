"""Shared test setup.

Like cloud-init's tests, unit tests may not start processes by accident: an autouse fixture
makes any subprocess fail unless the test opts in with ``@pytest.mark.allow_subprocess``
(integration tests, which exist to run real things, are opted in as a whole).
"""

import subprocess

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_subprocess: the test may start processes")


@pytest.fixture(autouse=True)
def _no_subprocess(request, monkeypatch):
    if request.node.get_closest_marker("allow_subprocess") or \
            "integration" in request.node.nodeid.split("/"):
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"unit test started a process {args!r}; mark it "
                             "@pytest.mark.allow_subprocess if that is intended")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
