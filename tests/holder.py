"""A forked process that holds a lock until told to let go (for tests of the writers' lock).

``with Holder(path, "exclusive") as pid:`` returns once the child holds the lock; leaving the
block releases it and reaps the child. A fork, not a subprocess: no interpreter start, and
the child runs the very code under test.
"""

from __future__ import annotations

import os
import signal


class Holder:
    def __init__(self, path, how: str = "exclusive"):
        self.path, self.how = path, how

    def __enter__(self) -> int:
        ready_r, ready_w = os.pipe()
        self.release_r, self.release_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: lock, say so, wait for the word, exit without cleanup handlers
            code = 0
            try:
                from defender_setup import lock

                os.close(ready_r)
                with getattr(lock, self.how)(self.path, timeout=5):
                    os.write(ready_w, b"1")
                    os.read(self.release_r, 1)
            except BaseException:
                code = 1
            os._exit(code)
        self.pid = pid
        os.close(ready_w)
        got = os.read(ready_r, 1)
        os.close(ready_r)
        assert got == b"1", "the holder could not take the lock"
        return pid

    def __exit__(self, *exc) -> None:
        os.write(self.release_w, b"1")
        os.close(self.release_w)
        os.close(self.release_r)
        if self.pid < 0:  # killed already
            return
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = -1
