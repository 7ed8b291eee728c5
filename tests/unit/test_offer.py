"""defender_setup.offer: where an offered set is found, read safely, and cleaned up."""

import os

import pytest

from defender_setup.errors import (
    CONNECTION_STRING,
    InputError,
    UnsafeTargetError,
    ValidationError,
)
from defender_setup.inputs import LIMITS
from defender_setup.offer import (
    REJECTED_NOTE,
    clear_folder,
    find_offer,
    note_rejection,
    searched,
    waiting_folder,
)

CS, CERT, KEY = "connection_string.txt", "certificate_public.pem", "certificate_private.pem"


def put(path, data: bytes, mode=0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_nothing_offered_is_none(root):
    root.mkdir()
    assert find_offer(root, environ={}) is None
    assert waiting_folder(root) is None


def test_system_credential_becomes_the_agent_file(root):
    path = put(root / "run/credentials/@system/defender-setup.connection-string", b"s3cr3t")
    offer = find_offer(root, environ={})
    assert offer.source == "credential" and offer.files == {CS: b"s3cr3t"}
    assert offer.where == {CS: str(path)}
    assert offer.label(CS) == "credential defender-setup.connection-string"
    assert "s3cr3t" not in repr(offer)


def test_units_own_directory_wins_then_system_then_credstores(root, tmp_path):
    unit_dir = tmp_path / "unit-creds"
    put(unit_dir / "defender-setup.connection-string", b"from-unit")
    put(root / "run/credentials/@system/defender-setup.connection-string", b"from-system")
    put(root / "run/credentials/@system/defender-setup.certificate", b"cert-system")
    put(root / "etc/credstore/defender-setup.certificate", b"cert-etc")
    put(root / "run/credstore/defender-setup.private-key", b"key-run")
    offer = find_offer(root, environ={"CREDENTIALS_DIRECTORY": str(unit_dir)})
    assert offer.files == {CS: b"from-unit", CERT: b"cert-system", KEY: b"key-run"}
    # each name is looked up on its own, as systemd resolves LoadCredential=ID
    assert offer.where[KEY] == str(root / "run/credstore/defender-setup.private-key")


def test_encrypted_credstore_goes_through_the_decrypter(root):
    path = put(root / "etc/credstore.encrypted/defender-setup.connection-string", b"sealed")
    calls = []

    def decrypt(name, where):
        calls.append((name, where))
        return b"plain"

    offer = find_offer(root, environ={}, decrypt=decrypt)
    assert offer.files == {CS: b"plain"}
    assert calls == [("defender-setup.connection-string", path)]


def test_a_decrypted_credential_over_its_limit_is_refused(root):
    # The decrypter's output is bounded as a plain file is: the same limit, a message
    # naming the credential and its path, never the content.
    path = put(root / "etc/credstore.encrypted/defender-setup.connection-string", b"sealed")
    limit = LIMITS[CONNECTION_STRING]
    with pytest.raises(InputError) as caught:
        find_offer(root, environ={}, decrypt=lambda name, where: b"x" * (limit + 1))
    assert str(caught.value) == (f"credential defender-setup.connection-string: {path} is "
                                 f"larger than {limit} bytes once decrypted")
    # exactly at the limit is accepted
    offer = find_offer(root, environ={}, decrypt=lambda name, where: b"x" * limit)
    assert len(offer.files[CS]) == limit


def test_encrypted_credstore_of_another_root_is_refused(root):
    put(root / "etc/credstore.encrypted/defender-setup.connection-string", b"sealed")
    with pytest.raises(InputError, match="only be decrypted on the running system"):
        find_offer(root, environ={})


def test_an_empty_credential_is_offered_not_ignored(root):
    put(root / "etc/credstore/defender-setup.connection-string", b"")
    assert find_offer(root, environ={}).files == {CS: b""}


def test_fifo_and_huge_files_are_refused_without_blocking(root):
    store = root / "etc/credstore"
    store.mkdir(parents=True)
    os.mkfifo(store / "defender-setup.connection-string")  # must not block the boot
    with pytest.raises(InputError, match="FIFO"):
        find_offer(root, environ={})
    (store / "defender-setup.connection-string").unlink()
    put(store / "defender-setup.connection-string", b"A" * (LIMITS[CONNECTION_STRING] + 1))
    with pytest.raises(ValidationError, match="at most"):
        find_offer(root, environ={})


def test_drop_folder_prefers_boot_firmware(root):
    put(root / "boot/firmware/defender-setup" / CS, b"fw")
    put(root / "boot/defender-setup" / CS, b"boot")
    offer = find_offer(root, environ={})
    assert offer.source == "drop-folder" and offer.files == {CS: b"fw"}
    assert offer.folder == root / "boot/firmware/defender-setup"
    assert offer.label(CS) == str(root / "boot/firmware/defender-setup" / CS)


def test_drop_folder_without_files_falls_through(root):
    (root / "boot/firmware/defender-setup").mkdir(parents=True)
    put(root / "boot/defender-setup" / CS, b"boot")
    assert find_offer(root, environ={}).folder == root / "boot/defender-setup"


def test_credentials_take_precedence_over_the_drop_folder(root):
    put(root / "boot/firmware/defender-setup" / CS, b"fw")
    put(root / "run/credstore/defender-setup.connection-string", b"cred")
    assert find_offer(root, environ={}).source == "credential"
    assert waiting_folder(root) == root / "boot/firmware/defender-setup"


def test_clear_folder_zeroes_and_removes_the_files_and_an_old_note(root):
    folder = root / "boot/firmware/defender-setup"
    put(folder / CS, b"secret", mode=0o755)  # FAT: every file looks like this
    put(folder / REJECTED_NOTE, b"old")
    put(folder / "README.txt", b"keep me")
    assert sorted(clear_folder(folder)) == sorted([CS, REJECTED_NOTE])
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt"]


def test_note_rejection_says_why(root):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    path = note_rejection(folder, "credential x: SharedAccessKey: is not valid base64")
    text = path.read_text()
    assert "is not valid base64" in text and "boot again" in text
    assert not (folder / (REJECTED_NOTE + ".tmp")).exists()


def test_note_rejection_never_writes_through_a_planted_link(root, tmp_path):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    victim = put(tmp_path / "motd", b"the administrator's file\n", mode=0o644)
    (folder / (REJECTED_NOTE + ".tmp")).symlink_to(victim)
    note_rejection(folder, "credential x: is missing")
    assert victim.read_bytes() == b"the administrator's file\n"
    assert not (folder / REJECTED_NOTE).is_symlink()
    assert "is missing" in (folder / REJECTED_NOTE).read_text()
    assert sorted(p.name for p in folder.iterdir()) == [REJECTED_NOTE]


def test_note_rejection_replaces_a_link_at_the_note_itself(root, tmp_path):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    victim = put(tmp_path / "motd", b"keep\n", mode=0o644)
    (folder / REJECTED_NOTE).symlink_to(victim)
    note_rejection(folder, "why")
    assert victim.read_bytes() == b"keep\n" and not (folder / REJECTED_NOTE).is_symlink()


def test_clear_folder_unlinks_a_hard_linked_file_without_zeroing_it(root, tmp_path):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    own = put(tmp_path / "my-copy.txt", b"HostName=...;SharedAccessKey=...")
    os.link(own, folder / CS)
    assert clear_folder(folder) == [CS]
    assert own.read_bytes() == b"HostName=...;SharedAccessKey=..."
    assert not (folder / CS).exists()


def test_clear_folder_removes_links_and_fifos_without_following_or_blocking(root, tmp_path):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    victim = put(tmp_path / "victim", b"outside")
    (folder / CS).symlink_to(victim)
    os.mkfifo(folder / CERT)
    assert sorted(clear_folder(folder)) == sorted([CS, CERT])
    assert victim.read_bytes() == b"outside" and list(folder.iterdir()) == []


@pytest.mark.parametrize("link", ["boot", "boot/defender-setup",
                                  "boot/defender-setup/connection_string.txt"])
def test_a_link_in_a_root_tree_drop_folder_is_refused(root, tmp_path, link):
    """--root TREE: no component between TREE and the file may lead out of the tree."""
    host = tmp_path / "host"
    put(host / "boot/defender-setup" / CS, b"host secret")
    root.mkdir()
    parent = (root / link).parent
    parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(host / link)
    with pytest.raises(UnsafeTargetError, match="symbolic link"):
        find_offer(root, environ={})
    assert (host / "boot/defender-setup" / CS).read_bytes() == b"host secret"


@pytest.mark.parametrize("link", ["etc", "etc/credstore",
                                  "etc/credstore/defender-setup.connection-string"])
def test_a_link_in_a_root_tree_credstore_is_refused(root, tmp_path, link):
    host = tmp_path / "host"
    put(host / "etc/credstore/defender-setup.connection-string", b"host secret")
    root.mkdir()
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(host / link)
    with pytest.raises(UnsafeTargetError, match="symbolic link"):
        find_offer(root, environ={})


def test_a_link_in_the_drop_folder_is_refused_and_names_the_folder(root, tmp_path):
    folder = root / "boot/defender-setup"
    folder.mkdir(parents=True)
    (folder / CS).symlink_to(put(tmp_path / "elsewhere", b"secret"))
    with pytest.raises(UnsafeTargetError) as caught:
        find_offer(root, environ={})
    partial = caught.value.offer
    assert partial.source == "drop-folder" and partial.folder == folder
    assert partial.where == {CS: str(folder / CS)} and partial.files == {}


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_an_unreadable_drop_folder_file_still_names_its_folder(root, kind):
    folder = root / "boot/firmware/defender-setup"
    folder.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(folder / CS)
    else:
        put(folder / CS, b"A" * (LIMITS[CONNECTION_STRING] + 1))
    with pytest.raises((InputError, ValidationError)) as caught:
        find_offer(root, environ={})
    partial = caught.value.offer
    assert partial.source == "drop-folder" and partial.folder == folder
    assert partial.where == {CS: str(folder / CS)}


def test_searched_names_every_place(root):
    text = searched(root)
    for part in ("defender-setup.connection-string", "$CREDENTIALS_DIRECTORY",
                 "run/credentials/@system", "etc/credstore.encrypted", "boot/firmware"):
        assert part in text

