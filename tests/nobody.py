"""Run a command as an unprivileged user, also when the tests run as root (CI does).

    run_as_nobody(argv, **subprocess_run_kwargs) -> subprocess.CompletedProcess

As root the command runs through ``setpriv`` as nobody:nogroup without supplementary groups;
otherwise it already runs unprivileged and is started as it is. Tests that use it allow
``setpriv`` and the command itself (``allow_subprocess("setpriv", "python3")``). What the
command reads must be reachable by nobody: a directory from :func:`shared_tmpdir`, not the
root-only ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def run_as_nobody(argv, **kwargs) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
    kwargs.setdefault("env", ENV)
    kwargs.setdefault("cwd", REPO)
    kwargs.setdefault("timeout", 30)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def shared_tmpdir() -> Path:
    """A fresh directory under /tmp that others may enter (0755); the caller removes it."""
    top = Path(tempfile.mkdtemp(prefix="defender-setup-nobody-"))
    top.chmod(0o755)
    return top
