"""The writers' lock across processes: forked holders (tests/holder.py) against this one."""

import os
import time

import pytest

from defender_setup import lock
from defender_setup.errors import BusyError
from tests.holder import Holder
from tests.waiting import wait_for


@pytest.fixture
def path(tmp_path):
    return tmp_path / "lock"


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


@pytest.mark.allow_subprocess("fork")
def test_a_killed_holder_leaves_no_stale_lock(path):
    holder = Holder(path)
    with holder:
        holder.kill()
        with lock.exclusive(path, timeout=0):
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
        # the writer holds the gate (the lock file's directory) while it waits for that reader
        wait_for(lambda: exclusive_flock_on(path.parent), 5, "the writer never took the gate")
        assert not got.is_set()
        with pytest.raises(BusyError):  # a new reader queues behind the writer
            with lock.shared(path, timeout=0.2):
                pass
    thread.join(5)                      # the first reader left: the writer got in
    assert got.is_set()


def exclusive_flock_on(directory) -> bool:
    """Whether an exclusive flock is held on ``directory``, read from /proc/locks: looking
    does not take the lock, so it cannot disturb the writer it watches."""
    st = os.stat(directory)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks", encoding="ascii", errors="replace") as handle:
        return any(parts[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and parts[5] == inode
                   for parts in (line.split() for line in handle) if len(parts) >= 6)
