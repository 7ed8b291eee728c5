"""defender_setup.offer.clear_folder against a drop folder changed while it is emptied: a
FIFO swapped in for a credential file must never block the import (it runs at boot, before
the agent, until its unit's timeout)."""

import os
import threading

from defender_setup.errors import WriteError
from defender_setup.offer import clear_folder

CS = "connection_string.txt"
ROUNDS = 3000


def test_a_fifo_swapped_in_for_a_file_never_blocks_clear_folder(tmp_path):
    folder = tmp_path / "defender-setup"
    folder.mkdir()
    stop, done = threading.Event(), threading.Event()

    def swapper():
        n = 0
        while not stop.is_set():
            n += 1
            plain, fifo = folder / f".p{n}", folder / f".f{n}"
            plain.write_bytes(b"x")
            os.mkfifo(fifo)
            os.replace(plain, folder / CS)
            os.replace(fifo, folder / CS)

    def clearer():
        for _ in range(ROUNDS):
            try:
                clear_folder(folder)
            except WriteError:  # the swapper removed the name under it: fine here
                pass
        done.set()

    threads = [threading.Thread(target=swapper, daemon=True),
               threading.Thread(target=clearer, daemon=True)]
    for thread in threads:
        thread.start()
    finished = done.wait(60)
    stop.set()
    if not finished:  # free the blocked writer: a reader on the FIFO it opened
        os.close(os.open(folder / CS, os.O_RDONLY | os.O_NONBLOCK))
    for thread in threads:
        thread.join(10)
    assert finished, "clear_folder blocked opening a FIFO for writing"
