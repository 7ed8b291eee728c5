"""defender_setup.lock: the bounded, re-entrant flock between commands."""

import os
import stat

import pytest

from defender_setup import lock
from defender_setup.errors import UnsafeTargetError


@pytest.fixture
def path(tmp_path):
    return tmp_path / "lock"


def test_exclusive_creates_a_private_file_with_our_pid_and_is_reentrant(path):
    with lock.exclusive(path, timeout=0):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert path.read_text() == f"{os.getpid()}\n"
        with lock.exclusive(path, timeout=0), lock.shared(path, timeout=0):
            pass  # nested: free, no wait
    with lock.exclusive(path, timeout=0):  # released at the end
        pass


def test_shared_never_creates_the_file(path):
    with lock.shared(path, timeout=0):
        pass
    assert not path.exists()


def test_a_symlinked_lock_file_is_refused(path, tmp_path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    path.symlink_to(target)
    for take in (lock.exclusive, lock.shared):
        with pytest.raises(UnsafeTargetError, match="symbolic link"):
            with take(path, timeout=0):
                pass
    assert target.read_text() == "precious\n"


def test_a_hard_linked_lock_file_is_refused_and_not_truncated(path, tmp_path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    os.link(target, path)
    with pytest.raises(UnsafeTargetError, match="hard-linked elsewhere") as err:
        with lock.exclusive(path, timeout=0):
            pass
    assert err.value.exit_code == 77
    assert target.read_text() == "precious\n"


def test_a_fifo_as_lock_file_is_refused_without_hanging(path):
    os.mkfifo(path)
    with pytest.raises(UnsafeTargetError, match="not a regular file"):
        with lock.shared(path, timeout=0):
            pass


def test_holds_says_whether_this_process_holds_the_lock(path):
    """What the agent directory asks to refresh the metrics once, at the outermost release."""
    assert not lock.holds(path)
    with lock.exclusive(path, timeout=1):
        assert lock.holds(path)
        with lock.exclusive(path, timeout=1):
            assert lock.holds(path)
        assert lock.holds(path)
    assert not lock.holds(path)
