"""The subprocess guard of tests/conftest.py: a test that starts a program it did not name
fails, even when the code under test catches ``Exception``."""

import os
import subprocess

import pytest

from tests.conftest import SubprocessForbidden


def test_an_unnamed_program_is_refused_past_except_exception():
    with pytest.raises(SubprocessForbidden, match="allow_subprocess\\('true'\\)"):
        try:
            subprocess.run(["true"])
        except Exception:  # what code under test does to turn OSError into a message
            pass
    with pytest.raises(SubprocessForbidden, match="'fork'"):
        os.fork()


@pytest.mark.allow_subprocess("true")
def test_only_the_named_programs_run():
    assert subprocess.run(["true"]).returncode == 0
    assert subprocess.run(["/bin/true"]).returncode == 0  # by base name
    with pytest.raises(SubprocessForbidden):
        subprocess.run(["false"])
    with pytest.raises(SubprocessForbidden):
        os.fork()
