"""defender_setup.safefs: files private from the first byte, and memory files for OpenSSL."""

from __future__ import annotations

import os
import stat

import pytest

from defender_setup import safefs


def test_create_has_its_mode_and_refuses_an_existing_name(tmp_path):
    path = tmp_path / "secret"
    safefs.create(path, b"data", 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        safefs.create(path, b"other", 0o600)


def test_memory_file_is_readable_by_its_path_and_gone_when_closed():
    data = b"-----BEGIN PRIVATE KEY-----\n" + b"k" * 200_000  # more than one write may take
    fd, path = safefs.memory_file("certificate_private.pem", data)
    try:
        assert path.read_bytes() == data
        assert "defender-setup-certificate_private.pem" in os.readlink(path)  # a memfd
    finally:
        os.close(fd)
    assert not path.exists()
