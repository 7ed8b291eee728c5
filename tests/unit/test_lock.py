"""defender_setup.lock: the bounded, re-entrant flock between commands."""

import os
import stat
import time

import pytest

from defender_setup import lock
from defender_setup.errors import BusyError, UnsafeTargetError

from .holder import Holder


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


@pytest.mark.allow_subprocess("fork")
def test_a_second_process_waits_a_bounded_time_and_learns_who_holds_it(path):
    with Holder(path) as pid:
        started = time.monotonic()
        with pytest.raises(BusyError) as err:
            with lock.exclusive(path, timeout=0.3):
                pass
        waited = time.monotonic() - started
    assert 0.3 <= waited < 2
    assert err.value.exit_code == 75
    assert f"pid {pid}" in str(err.value) and "--lock-timeout" in str(err.value)


@pytest.mark.allow_subprocess("fork")
def test_readers_wait_for_a_writer_and_writers_for_readers(path):
    with Holder(path, "exclusive"):
        with pytest.raises(BusyError):
            with lock.shared(path, timeout=0.1):
                pass
    with Holder(path, "shared"):
        with lock.shared(path, timeout=0):  # readers share
            pass
        with pytest.raises(BusyError):
            with lock.exclusive(path, timeout=0.1):
                pass


def test_shared_never_creates_the_file(path):
    with lock.shared(path, timeout=0):
        pass
    assert not path.exists()


@pytest.mark.allow_subprocess("fork")
def test_a_killed_holder_leaves_no_stale_lock(path):
    holder = Holder(path)
    with holder:
        holder.kill()
        with lock.exclusive(path, timeout=0):
            pass


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


@pytest.mark.allow_subprocess("fork")
def test_a_waiting_writer_is_not_starved_by_new_readers(path):
    import threading

    got = threading.Event()

    def writer():
        with lock.exclusive(path, timeout=5):
            got.set()

    with lock.exclusive(path, timeout=0):
        pass  # the lock file exists
    with Holder(path, "shared"):        # a reader inside
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.2)                 # the writer waits at the gate for that reader
        assert not got.is_set()
        with pytest.raises(BusyError):  # a new reader queues behind the writer
            with lock.shared(path, timeout=0.2):
                pass
    thread.join(5)                      # the first reader left: the writer got in
    assert got.is_set()
