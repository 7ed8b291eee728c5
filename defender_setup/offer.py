"""Find the credential set a machine is offered at boot: systemd credentials or a drop folder.

Interface::

    find_offer(root, environ=None, decrypt=None) -> Offer | None
        raises InputError, ValidationError (too large) or UnsafeTargetError (a link); the
        error's ``offer`` is the partial Offer (no files) naming the source, folder and path
    Offer.source      "credential" | "drop-folder"
    Offer.files       {agent directory file name: bytes}  (secrets: kept out of repr)
    Offer.where       {file name: path it was read from}   (safe to print and record)
    Offer.label(name) what a person calls that input: "credential defender-setup.certificate"
                      or "/boot/firmware/defender-setup/certificate_public.pem"
    Offer.folder      the drop folder (None for credentials)
    Offer.dps         True when it is a DPS enrollment (a ``dps-*`` input offered): the
                      device registers itself (zero-touch) instead of storing a set
    waiting_folder(root) -> Path | None      a drop folder with files in it (not read)
    clear_folder(folder) / note_rejection(folder, reason)

Where an offer is looked for, first match wins:

1. systemd credentials, each name on its own, as systemd resolves ``LoadCredential=ID``:
   ``$CREDENTIALS_DIRECTORY`` (the unit's own copy, when it runs with ``LoadCredential=``),
   then the system credentials PID 1 received (``/run/credentials/@system``: nspawn
   ``--load-credential``, SMBIOS type 11, ``systemd.set_credential=`` on the kernel command
   line), then ``/etc/credstore`` and ``/run/credstore``, then ``/etc/credstore.encrypted`` and
   ``/run/credstore.encrypted`` (made with ``systemd-creds encrypt``; decrypted through
   ``systemd-creds decrypt`` into a pipe, only when ``root`` is ``/``). Reading them directly
   as well keeps systemd versions without credstore search (Debian 11) working.
2. only when no credential is offered: the boot partition's drop folder,
   ``/boot/firmware/defender-setup/`` (Raspberry Pi OS and Debian's raspi images) or else
   ``/boot/defender-setup/``, holding files named as in the agent directory.

Nothing here validates content (that is :mod:`defender_setup.credentials`) and nothing writes
the agent directory. Every input is read by :func:`defender_setup.inputs.read_file`: a
regular file (a FIFO never blocks the boot), at most the field's limit; messages name the
path, never the content.

The drop folder is hostile (anyone with the SD card, or any user on a FAT partition): its
files are never links (refused, 77), and it is changed only through a descriptor of the
folder opened O_NOFOLLOW, by names created O_EXCL|O_NOFOLLOW, never writing into a file
linked elsewhere. Under a ``root`` other than ``/`` (``--root TREE``) no directory between
the tree and an input may be a link either: nothing is read or written outside the tree.

A DPS offer (zero-touch: any ``dps-*`` input) holds ``dps-id-scope`` and a key
(``dps-symmetric-key``, the device's own, or ``dps-group-key``, its enrollment group's), or a
certificate and private key for X.509, optionally ``dps-registration-id`` (default: the
machine id) and ``dps-endpoint``; as credentials they are named ``defender-setup.dps-id-scope``
and so on.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import sealing
from .credentials import CERTIFICATE_FILE, CONNECTION_STRING_FILE, PRIVATE_KEY_FILE
from .errors import (
    CERTIFICATE,
    CONNECTION_STRING,
    PRIVATE_KEY,
    Field,
    InputError,
    SetupError,
    UnsafeTargetError,
    WriteError,
)
from .inputs import LIMITS, read_file
from .safefs import lstat, replace

# Credential name (DESIGN: fixed) -> the agent directory file it becomes.
CREDENTIALS = {
    "defender-setup.connection-string": CONNECTION_STRING_FILE,
    "defender-setup.certificate": CERTIFICATE_FILE,
    "defender-setup.private-key": PRIVATE_KEY_FILE,
}
# Zero-touch: what a device registers with DPS by (credential -> drop-folder file).
DPS_ID_SCOPE_FILE = "dps-id-scope"
DPS_REGISTRATION_ID_FILE = "dps-registration-id"
DPS_SYMMETRIC_KEY_FILE = "dps-symmetric-key"
DPS_GROUP_KEY_FILE = "dps-group-key"
DPS_ENDPOINT_FILE = "dps-endpoint"
DPS_FILES = {DPS_ID_SCOPE_FILE: Field.DPS_ID_SCOPE,
             DPS_REGISTRATION_ID_FILE: Field.DPS_REGISTRATION_ID,
             DPS_SYMMETRIC_KEY_FILE: Field.DPS_KEY, DPS_GROUP_KEY_FILE: Field.DPS_KEY,
             DPS_ENDPOINT_FILE: Field.DPS_ENDPOINT}
CREDENTIALS.update({f"defender-setup.{name}": name for name in DPS_FILES})
CREDENTIAL_OF = {file: name for name, file in CREDENTIALS.items()}
SYSTEM_CREDENTIALS = "run/credentials/@system"
CREDSTORES = ("etc/credstore", "run/credstore")
ENCRYPTED_CREDSTORES = ("etc/credstore.encrypted", "run/credstore.encrypted")
DROP_FOLDERS = ("boot/firmware/defender-setup", "boot/defender-setup")
REJECTED_NOTE = "defender-setup.rejected.txt"
# The field each file is validated as; inputs.LIMITS bounds what is read for it.
FIELD_OF = {CONNECTION_STRING_FILE: CONNECTION_STRING, CERTIFICATE_FILE: CERTIFICATE,
            PRIVATE_KEY_FILE: PRIVATE_KEY, **DPS_FILES}
DECRYPT_TIMEOUT = 30
SOURCE_CREDENTIAL = "credential"
SOURCE_DROP_FOLDER = "drop-folder"


@dataclass(frozen=True)
class Offer:
    """One offered set; ``files`` are secrets and stay out of ``repr``."""

    source: str
    files: dict = field(repr=False)
    where: dict
    folder: Path | None = None

    @property
    def dps(self) -> bool:
        # Any DPS input: a group key offered without its ID scope is named as such, not as a
        # set missing its connection string.
        return any(name in self.files for name in DPS_FILES)

    def label(self, name: str) -> str:
        if self.source == SOURCE_CREDENTIAL:
            return f"credential {CREDENTIAL_OF[name]}"
        return str(self.folder / name)

    def describe(self) -> str:
        if self.source == SOURCE_CREDENTIAL:
            places = sorted({str(Path(path).parent) for path in self.where.values()})
            return f"systemd credentials ({', '.join(places)})"
        return f"the drop folder {self.folder}"


def _refuse_links(root: Path, path: Path) -> None:
    """UnsafeTargetError (77) for a link at ``path`` or, under a root tree, at any directory
    between the tree and it: it could lead out of the tree or the folder."""
    steps = [path]
    if root.resolve() != Path("/") and path.is_relative_to(root):
        parts = path.relative_to(root).parts
        steps = [root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    for step in steps:
        if os.path.islink(step):
            raise UnsafeTargetError(f"{step} is a symbolic link; refusing to follow it (offer "
                                    "the file itself, not a link)")


def _read(root: Path, path: Path, file: str, partial: Offer, follow: bool) -> bytes:
    """One offered file; an error carries ``partial`` (where it came from, no content)."""
    try:
        if not follow:
            _refuse_links(root, path)
        return read_file(str(path), FIELD_OF[file], follow=follow)
    except SetupError as exc:
        exc.offer = partial
        raise


def _systemd_creds_decrypt(name: str, path: Path) -> bytes:
    """Decrypt a credstore.encrypted file; the plaintext comes back through a pipe."""
    try:
        proc = sealing.run([sealing.SYSTEMD_CREDS, "decrypt", f"--name={name}", str(path),
                            "-"], b"", DECRYPT_TIMEOUT)
    except FileNotFoundError:
        raise InputError(f"credential {name}: {path} is encrypted but systemd-creds is not "
                         "installed (systemd 250 or later); store it unencrypted in "
                         f"{Path(path).parent.name.replace('.encrypted', '')}/ "
                         "instead") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"credential {name}: systemd-creds decrypt {path} did not finish "
                         f"within {DECRYPT_TIMEOUT} s") from None
    if proc.returncode != 0:
        raise InputError(f"credential {name}: cannot decrypt {path}: "
                         f"{sealing.failure(proc)}; encrypt it on this machine "
                         f"(systemd-creds encrypt --name={name})")
    return proc.stdout


def _find_credentials(root: Path, environ, decrypt) -> Offer | None:
    files, where = {}, {}
    tree = root.resolve() != Path("/")  # a --root tree: no link may lead out of it
    dirs = [root / d for d in (SYSTEM_CREDENTIALS, *CREDSTORES)]
    if environ.get("CREDENTIALS_DIRECTORY"):  # the unit's own copy first
        dirs.insert(0, Path(environ["CREDENTIALS_DIRECTORY"]))
    for name, file in CREDENTIALS.items():
        plain = [directory / name for directory in dirs]
        encrypted = [root / directory / name for directory in ENCRYPTED_CREDSTORES]
        path = next((p for p in plain + encrypted if os.path.lexists(p)), None)
        if path is None:
            continue
        where[file] = str(path)
        if path in plain:
            partial = Offer(SOURCE_CREDENTIAL, {}, dict(where))
            files[file] = _read(root, path, file, partial, follow=not tree)
            continue
        if decrypt is None:
            raise InputError(f"credential {name}: {path} is encrypted and can only be "
                             "decrypted on the running system (--root /)")
        files[file] = decrypt(name, path)
        if len(files[file]) > LIMITS[FIELD_OF[file]]:
            raise InputError(f"credential {name}: {path} is larger than "
                             f"{LIMITS[FIELD_OF[file]]} bytes once decrypted")
    if not files:
        return None
    return Offer(SOURCE_CREDENTIAL, files, where)


def _find_folder(root: Path) -> Offer | None:
    for directory in DROP_FOLDERS:
        folder = root / directory
        if root.resolve() != Path("/"):
            _refuse_links(root, folder)  # e.g. the tree's boot/ linked to the host's /boot
        if not folder.is_dir() or folder.is_symlink():
            continue
        files, where = {}, {}
        for file in CREDENTIALS.values():
            path = folder / file
            if os.path.lexists(path):
                where[file] = str(path)
                partial = Offer(SOURCE_DROP_FOLDER, {}, dict(where), folder=folder)
                files[file] = _read(root, path, file, partial, follow=False)
        if files:
            return Offer(SOURCE_DROP_FOLDER, files, where, folder=folder)
    return None


def waiting_folder(root: Path | str = "/") -> Path | None:
    """A drop folder holding credential files (not read: only whether they are there)."""
    for directory in DROP_FOLDERS:
        folder = Path(root) / directory
        if folder.is_dir() and any(os.path.lexists(folder / f) for f in CREDENTIALS.values()):
            return folder
    return None


def find_offer(root: Path | str = "/", environ=None, decrypt=None) -> Offer | None:
    """The offered set, or None when nothing is offered (see the module docstring).

    :param environ: the environment to read ``CREDENTIALS_DIRECTORY`` from (tests).
    :param decrypt: ``decrypt(name, path) -> bytes`` for credstore.encrypted; by default
        ``systemd-creds decrypt`` when ``root`` is ``/``.
    """
    root = Path(root)
    environ = os.environ if environ is None else environ
    if decrypt is None and root == Path("/"):
        decrypt = _systemd_creds_decrypt
    return _find_credentials(root, environ, decrypt) or _find_folder(root)


def searched(root: Path | str = "/") -> str:
    """Where :func:`find_offer` looks, for the "nothing offered" message."""
    root = Path(root)
    places = ["$CREDENTIALS_DIRECTORY", SYSTEM_CREDENTIALS, *CREDSTORES, *ENCRYPTED_CREDSTORES]
    places = [p if p.startswith("$") else str(root / p) for p in places]
    return (f"credentials {', '.join(CREDENTIALS)} in {', '.join(places)}; "
            f"drop folders {', '.join(str(root / d) for d in DROP_FOLDERS)}")


# -- the drop folder after an import ---------------------------------------------------------
def _open_folder(folder: Path) -> int:
    # Every change goes through this descriptor: the folder itself cannot be swapped for a
    # link between the checks and the writes.
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _zero(name: str, dir_fd: int) -> None:
    """Overwrite ``name`` with zeros if it is a regular file linked nowhere else."""
    try:  # O_NONBLOCK: a FIFO swapped in fails at once (ENXIO) instead of waiting for a reader
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return  # a link, a FIFO, a directory: only removed
        raise
    try:
        st = os.fstat(fd)
        # A hard link is someone's own copy elsewhere: unlinking this name is all we may do.
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return
        zeros = b"\0" * 65536
        for offset in range(0, st.st_size, len(zeros)):
            os.write(fd, zeros[:st.st_size - offset])
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_folder(folder: Path) -> list[str]:
    """Remove the imported files (and an old rejection note) from the drop folder.

    Contents are overwritten with zeros before the unlink: on FAT a deleted file's clusters
    keep their data. This is best effort (flash storage remaps blocks), which the README says.
    A file with other hard links is only unlinked, never written.
    :returns: the names removed.
    """
    removed = []
    try:
        dir_fd = _open_folder(folder)
    except OSError as exc:
        raise WriteError(f"cannot open {folder}: {exc.strerror}") from None
    try:
        for name in (*CREDENTIALS.values(), REJECTED_NOTE):
            if lstat(name, dir_fd) is None:
                continue
            try:
                if name != REJECTED_NOTE:
                    _zero(name, dir_fd)
                os.unlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise WriteError(f"cannot remove {folder / name} from the boot partition: "
                                 f"{exc.strerror}; remove it by hand") from None
            removed.append(name)
        _fsync_dir(dir_fd)
    finally:
        os.close(dir_fd)
    return removed


def note_rejection(folder: Path, reason: str, now: float | None = None) -> Path:
    """Write ``defender-setup.rejected.txt`` beside a rejected set (no secret: the reason)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    text = (f"defender-setup did not import the files in this folder ({stamp}):\n"
            f"{reason}\n"
            "Fix the files (or replace them) and boot again; the agent keeps its previous "
            "identity until then.\n")
    path = folder / REJECTED_NOTE
    try:
        dir_fd = _open_folder(folder)
        try:  # a new file renamed into place: a link at either name is replaced, never followed
            replace(Path(REJECTED_NOTE), text.encode("utf-8"), 0o644, dir_fd=dir_fd)
            _fsync_dir(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _fsync_dir(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError:  # some FAT drivers refuse fsync on a directory; the unlink stands
        pass
