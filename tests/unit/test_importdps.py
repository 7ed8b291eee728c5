"""defender_setup.importdps and the DPS side of defender_setup.offer: an offered enrollment
is found, read like a set, checked, labelled with what was offered, and cleared."""

from __future__ import annotations

import base64

import pytest

from defender_setup import dps
from defender_setup.errors import SetupError, UnsafeTargetError
from defender_setup.importdps import enrollment_of
from defender_setup.offer import Offer, clear_folder, find_offer, waiting_folder

SCOPE = b"0ne0000ABCD\n"
GROUP = base64.b64encode(bytes(range(64)))
MACHINE = "0123456789abcdef0123456789abcdef"
CRED = "run/credentials/@system"


def put(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture
def device(root):
    put(root / "etc/machine-id", (MACHINE + "\n").encode())
    return root


def test_credentials_offer_a_group_enrollment(device):
    put(device / CRED / "defender-setup.dps-id-scope", SCOPE)
    put(device / CRED / "defender-setup.dps-group-key", GROUP + b"\n")
    offer = find_offer(device, environ={})
    assert offer.dps and offer.source == "credential"
    assert offer.label("dps-group-key") == "credential defender-setup.dps-group-key"
    assert GROUP.decode() not in repr(offer)
    e = enrollment_of(offer, device)
    assert (e.id_scope, e.registration_id, e.group_key) == ("0ne0000ABCD", MACHINE, True)
    assert e.device_key == dps.derive_device_key(GROUP, MACHINE)  # per device, never stored
    assert e.endpoint == dps.GLOBAL_ENDPOINT


def test_a_set_offer_is_not_dps(device):
    put(device / CRED / "defender-setup.connection-string", b"HostName=x")
    assert not find_offer(device, environ={}).dps


def test_the_drop_folder_offers_an_enrollment_and_is_cleared_after(device):
    folder = device / "boot/firmware/defender-setup"
    put(folder / "dps-id-scope", SCOPE)
    put(folder / "dps-symmetric-key", GROUP)
    put(folder / "dps-registration-id", b"sensor-17\n")
    put(folder / "dps-endpoint", b"dps.example.net:8443\n")
    assert waiting_folder(device) == folder
    offer = find_offer(device, environ={})
    assert offer.source == "drop-folder" and offer.dps
    e = enrollment_of(offer, device)
    assert (e.registration_id, e.group_key, *dps.address(e.endpoint)) == \
        ("sensor-17", False, "dps.example.net", 8443)
    assert sorted(clear_folder(folder)) == ["dps-endpoint", "dps-id-scope",
                                             "dps-registration-id", "dps-symmetric-key"]
    assert list(folder.iterdir()) == []


def test_a_link_in_the_drop_folder_is_refused(device, tmp_path):
    folder = device / "boot/firmware/defender-setup"
    put(folder / "dps-id-scope", SCOPE)
    (folder / "dps-group-key").symlink_to(put(tmp_path / "elsewhere", GROUP))
    with pytest.raises(UnsafeTargetError):
        find_offer(device, environ={})


def error_of(files: dict, root, source="credential", folder=None) -> str:
    where = {n: (str(folder / n) if folder else f"/{CRED}/defender-setup.{n}") for n in files}
    with pytest.raises(SetupError) as caught:
        enrollment_of(Offer(source, files, where, folder=folder), root)
    message = str(caught.value)
    assert GROUP.decode() not in message and "\n" not in message
    return message


def test_bad_input_names_the_credential_or_file_and_the_fix(device, tmp_path):
    ok = {"dps-id-scope": SCOPE, "dps-group-key": GROUP}
    assert error_of({**ok, "dps-id-scope": b"one0000ABCD"}, device).startswith(
        "credential defender-setup.dps-id-scope: ")
    assert error_of({**ok, "dps-group-key": GROUP[:-8] + b"!!"}, device).startswith(
        "credential defender-setup.dps-group-key: ")
    assert error_of({**ok, "dps-registration-id": b"UPPER case"}, device).startswith(
        "credential defender-setup.dps-registration-id: ")
    assert error_of({**ok, "dps-endpoint": b"https://dps/"}, device).startswith(
        "credential defender-setup.dps-endpoint: ")
    both = error_of({**ok, "dps-symmetric-key": GROUP}, device)
    assert "not both" in both
    with_set = error_of({**ok, "connection_string.txt": b"HostName=h"}, device)
    assert with_set.startswith("credential defender-setup.connection-string: ")
    assert error_of({"dps-id-scope": b"0ne00"}, device, "drop-folder",
                    tmp_path).startswith(f"{tmp_path / 'dps-id-scope'}: ")


def test_an_unset_machine_id_is_about_no_offered_file(root):
    put(root / "etc/machine-id", b"uninitialized\n")
    message = error_of({"dps-id-scope": SCOPE, "dps-group-key": GROUP}, root)
    assert message.startswith("DPS registration ID: not given, and /etc/machine-id")


def test_a_group_key_without_its_id_scope_is_named_as_such(device):
    put(device / CRED / "defender-setup.dps-group-key", GROUP)
    offer = find_offer(device, environ={})
    assert offer.dps
    with pytest.raises(SetupError) as caught:
        enrollment_of(offer, device)
    assert str(caught.value).startswith("DPS ID scope: empty is not an ID scope")
