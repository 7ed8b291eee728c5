"""defender_setup.inputs: bounded reads of regular files and standard input, never blocking."""

from __future__ import annotations

import io
import os
import socket
import threading

import pytest

from defender_setup.errors import (
    CERTIFICATE,
    CONNECTION_STRING,
    EX_DATAERR,
    EX_NOINPUT,
    PRIVATE_KEY,
    InputError,
    SetupError,
    ValidationError,
)
from defender_setup.inputs import LIMITS, read_file, read_stream


def refused(path, field=CONNECTION_STRING) -> SetupError:
    with pytest.raises(SetupError) as info:
        read_file(str(path), field)
    assert info.value.field == field
    return info.value


def test_reads_a_regular_file_and_follows_a_symlink(tmp_path):
    (tmp_path / "cs.txt").write_bytes(b"HostName=x")
    (tmp_path / "link").symlink_to(tmp_path / "cs.txt")
    assert read_file(str(tmp_path / "link"), CONNECTION_STRING) == b"HostName=x"


def test_dev_null_reads_as_empty():
    assert read_file("/dev/null", PRIVATE_KEY) == b""


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"),
                                        ("/", "a directory")])
def test_non_regular_files_are_refused_before_reading(path, kind):
    exc = refused(path, CERTIFICATE)
    assert isinstance(exc, InputError) and exc.exit_code == EX_NOINPUT
    assert f"{path} is {kind}, not a regular file" in str(exc)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            read_file(str(fifo), CONNECTION_STRING)
        except SetupError as exc:
            result["error"] = exc

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # blocked in open(): release it with a writer, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result["error"], InputError)
    assert "a FIFO (named pipe)" in str(result["error"])


def test_a_socket_is_refused(tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        assert "a socket" in str(refused(tmp_path / "sock"))


def test_missing_and_unreadable_files(tmp_path):
    assert "does not exist" in str(refused(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    assert "cannot read" in str(refused(tmp_path / "file" / "x"))  # ENOTDIR
    exc = refused(tmp_path / "nul\nline\x1b[0m")
    assert "\n" not in str(exc) and "\x1b" not in str(exc)  # paths are shown escaped


@pytest.mark.parametrize("field, limit, said", [(CONNECTION_STRING, 1024, "1024 bytes"),
                                                (CERTIFICATE, 768 << 10, "768 KiB"),
                                                (PRIVATE_KEY, 64 << 10, "64 KiB")])
def test_oversized_files_are_refused_with_the_limit(tmp_path, field, limit, said):
    assert LIMITS[field] == limit
    path = tmp_path / "big"
    path.write_bytes(b"x" * limit)
    assert len(read_file(str(path), field)) == limit  # the limit itself is accepted
    path.write_bytes(b"x" * (limit + 1))
    exc = refused(path, field)
    assert isinstance(exc, ValidationError) and exc.exit_code == EX_DATAERR
    assert f"at most {said}" in str(exc) and f"is {limit + 1} bytes" in str(exc)


class Endless(io.RawIOBase):
    """A stream like /dev/zero that counts what was asked of it."""

    def __init__(self):
        self.given = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), 4096)
        buffer[:n] = b"\0" * n
        self.given += n
        return n


def test_standard_input_is_read_with_the_same_cap():
    raw = Endless()
    with pytest.raises(ValidationError) as info:
        read_stream(io.BufferedReader(raw), CONNECTION_STRING)
    assert "standard input holds over 1024 bytes" in str(info.value)
    assert "at most 1024 bytes" in str(info.value)
    assert raw.given < 64 * 1024, "read far past the limit"
    assert read_stream(io.BytesIO(b"x" * 1024), CONNECTION_STRING) == b"x" * 1024


def test_closed_standard_input_is_an_input_error():
    with pytest.raises(InputError, match="standard input is closed"):
        read_stream(None, CONNECTION_STRING)
    closed = io.BytesIO(b"x")
    closed.close()
    with pytest.raises(InputError, match="cannot read standard input"):
        read_stream(closed, CERTIFICATE)
