"""Sealed credentials: the secret files stored encrypted by ``systemd-creds`` (systemd >= 250).

Interface::

    refusal(root) -> str | None                  # why sealing is impossible (systemd < 250)
    require(root)                                # raises SealingError with that reason
    deferral(root, environ=None) -> str | None   # why it must wait for the first boot
    seal(files, method, runner=None) -> files    # {name: (data, mode)}: NAME -> NAME.cred
    encrypt(name, data, runner=None) / decrypt(name, sealed, runner=None) -> bytes
                                                 # one secret kept elsewhere (DPS device key)
    open_set(current, runner=None) -> (plain {name: bytes}, Sealing)   # what readers use
    decrypted(current, context="") -> (plain, Sealing)   # ... or SealingError
    key_kind(sealed: bytes) -> str | None        # "host key", "TPM2 + host key", ... (pure)
    store(agent, files, method, seal_it, *, environ=None, runner=None, defer=None)
        -> list[str]                             # the writer: plain or sealed, or deferred
    plain_left(agent, current=None) -> list[str] # plain secrets in a sealed set's previous
    seal_previous(agent, runner=None) -> lines   # seal those where they are
    PLAIN_LEFT.format(names)                     # what status and check say about them
    PENDING                                      # AgentDir record: sealing waits for 1st boot

How and why:

* Only the files holding a secret are sealed (``credentials.SECRET_FILES``: the connection
  string with a SharedAccessKey, the private key); the certificate and an ``x509=true``
  connection string stay readable. ``NAME.cred`` replaces ``NAME`` in the agent directory, in
  the same atomic set (``AgentDir.write``), and the unit loads it with
  ``LoadCredentialEncrypted=NAME.cred:PATH``: systemd decrypts it into the service's private
  credentials directory, so the agent code is the same for plain and sealed sets.
* Secrets travel through pipes only: ``systemd-creds encrypt --name=NAME.cred --with-key=auto
  - -`` reads the plain text on standard input and writes the sealed text on standard output,
  ``decrypt`` the reverse; nothing is on a command line or in a temporary file. The name is
  bound into the sealed data: a file renamed to another role does not decrypt.
* ``--with-key=auto``: the TPM2 and the host key (``/var/lib/systemd/credential.secret``,
  created on first use) when the machine has a TPM2, the host key alone otherwise.
* No plain copy stays behind, whatever fails when: every encryption (the new set's, and the
  old set's when it still holds a plain secret) happens before anything is written, and one
  transaction (``AgentDir.write(..., previous=...)``) makes the sealed new set current and
  the sealed old set the previous generation (kept for ``rollback``). A failing encrypt
  writes nothing. A plain secret left in a sealed set's previous generation (an older
  version's interrupted seal, a rollback from plain files) is reported by ``status`` and
  ``check`` and sealed where it is by ``seal``.
* In a chroot or image build (``DPKG_ROOT``, no running systemd, another ``--root``) sealing
  would use the build host's key, or bake one key into every copy of the image: the set is
  written plain and the ``PENDING`` record makes ``defender-setup-seal.service`` seal it with
  the machine's own key at first boot.
"""

from __future__ import annotations

import base64
import binascii
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .credentials import CERTIFICATE_FILE, SEALED_NAMES, SECRET_FILES, method_of
from .errors import EX_CONFIG, Field, SetupError

SYSTEMD_CREDS = "systemd-creds"
PENDING = "seal-pending"  # AgentDir record, see the module docstring
FIELD = Field.SEALING  # what a SealingError is about (the debconf bridge routes it)
SEAL_UNIT = "defender-setup-seal.service"
PLAIN_LEFT = ("a plain secret is left in the previous generation ({}); run 'defender-setup seal' "
              "to seal it")
TIMEOUT = 60  # seconds; a TPM2 can take a second or two per operation
_PLAIN = {sealed: plain for plain, sealed in SEALED_NAMES.items()}
# The first 16 bytes of a sealed credential say which keys seal it (systemd's creds-util.h).
_KINDS = {
    "5a1c6a86df9d4096b1d5a65e0862f19a": "host key",
    "55b9ed1d38594d43a8319d2ebb332ac6": "host key",
    "0c7cc07b117645919c4b0bea08bc20fe": "TPM2",
    "faf7eb9341e3412ca1a436f95a29362f": "TPM2",
    "93a894094874449090caf2fc93cab553": "TPM2 + host key",
    "ef4ac13679a9480ea7db68897f9f165d": "TPM2 + host key",
    "af4950a849134eb1a73846304ff30c05": "TPM2 + host key",
    "adbc4ca3efb64201ba881b6f2e4095ea": "TPM2 + host key",
    "058469daf6f54324800549da0f8ea2fb": "null key (no protection)",
}

Runner = Callable[[list, bytes], subprocess.CompletedProcess]


class SealingError(SetupError):
    """Sealing is impossible here, or a sealed file does not decrypt (exit 78)."""

    exit_code = EX_CONFIG

    def __init__(self, message: str):
        super().__init__(message, FIELD)


@dataclass(frozen=True)
class Sealing:
    """How a stored set keeps its secrets: ``sealed`` names, their keys, a decryption error."""

    sealed: tuple = ()
    keys: str = ""
    error: str | None = None

    def describe(self) -> str:
        if not self.sealed:
            return "plain files (root-only)"
        return f"sealed ({self.keys})" if not self.error else f"sealed, {self.error}"


def run(argv: list, data: bytes, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``systemd-creds``' way of running: ``data`` on its standard input, its output through
    pipes (a secret is never on a command line or in a file); raises as ``subprocess.run``."""
    # A small fixed environment: nothing of the caller's reaches systemd-creds.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "SYSTEMD_COLORS": "0"}
    return subprocess.run(argv, input=data, capture_output=True, timeout=timeout, env=env,
                          check=False)


def failure(proc: subprocess.CompletedProcess) -> str:
    """Why ``systemd-creds`` failed, in its own words (its last line, e.g. "incorrect key?"),
    which never hold the content."""
    lines = [line for line in (proc.stderr or b"").decode("utf-8", "replace").splitlines()
             if line.strip() and "encrypted media" not in line]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _creds(runner: Runner | None, verb: str, name: str, data: bytes) -> bytes:
    argv = [SYSTEMD_CREDS, verb, f"--name={name}"]
    if verb == "encrypt":
        argv.append("--with-key=auto")
    try:
        proc = (runner or run)(argv + ["-", "-"], data)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SealingError(f"{name}: cannot run {SYSTEMD_CREDS}: {exc}") from None
    if proc.returncode != 0:
        what = "does not decrypt on this machine" if verb == "decrypt" else "cannot be sealed"
        raise SealingError(f"{name} {what}: {failure(proc)}")
    return proc.stdout or b""


def encrypt(name: str, data: bytes, runner: Runner | None = None) -> bytes:
    """``data`` sealed under ``name`` (bound into it): a secret kept beside the set."""
    return _creds(runner, "encrypt", name, data)


def decrypt(name: str, sealed: bytes, runner: Runner | None = None) -> bytes:
    """What :func:`encrypt` sealed; :raises SealingError: not on this machine, or renamed."""
    return _creds(runner, "decrypt", name, sealed)


def key_kind(sealed: bytes) -> str | None:
    """Which keys seal ``sealed`` (the text ``systemd-creds encrypt`` writes); None: unknown."""
    try:
        head = base64.b64decode(b"".join(sealed.split())[:24], validate=True)[:16]
    except (binascii.Error, ValueError):
        return None
    return _KINDS.get(head.hex())


def refusal(root: Path | str = "/") -> str | None:
    """One line saying why sealing cannot work on the system under ``root``, or None."""
    root = Path(root)
    from .target import detect

    agent = detect(root)
    if agent.microsoft:  # its unit is Microsoft's: no systemd credential decrypts for it
        return (f"{agent.describe()} reads plain files only (sealed files are decrypted by "
                "defender-setup-agent's unit): leave the credentials unsealed")
    # The same test as the config script (which asks the question) and the generator (which
    # loads sealed files): systemd >= 250 installs it there.
    if (root / "usr/bin" / SYSTEMD_CREDS).exists():
        return None
    versions = sorted(path.name.split("-")[-1].split(".")[0] for base in ("usr/lib", "lib")
                      for path in (root / base / "systemd").glob("libsystemd-shared-*.so"))
    found = f"this system has systemd {versions[-1]}" if versions else "systemd is not installed"
    return (f"needs systemd 250 or later (systemd-creds, Debian 12 or later); {found}: "
            "leave the credentials unsealed")


def require(root: Path | str = "/") -> None:
    """Raise :class:`SealingError` (one line) where sealing cannot work at all."""
    reason = refusal(root)
    if reason:
        raise SealingError(reason)


def deferral(root: Path | str = "/", environ: dict | None = None) -> str | None:
    """Why sealing must wait for the first boot of the system under ``root``, or None."""
    environ = os.environ if environ is None else environ
    if environ.get("DPKG_ROOT"):
        return f"DPKG_ROOT is set ({environ['DPKG_ROOT']})"
    if Path(root).resolve() != Path("/"):
        return f"{root} is not the running system"
    if not (Path(root) / "run/systemd/system").is_dir():
        return "systemd is not running (a chroot or image build)"
    return None


def seal(files: dict, method: str, runner: Runner | None = None) -> dict:
    """``files`` ({name: (data, mode)}) with the secret files of ``method`` sealed."""
    result = {}
    for name, (data, mode) in files.items():
        if name in SECRET_FILES[method]:
            sealed_name = SEALED_NAMES[name]
            result[sealed_name] = (_creds(runner, "encrypt", sealed_name, data), 0o600)
        else:
            result[name] = (data, mode)
    return result


def open_set(current: dict, runner: Runner | None = None) -> tuple[dict, Sealing]:
    """The plain view of a stored set: sealed files decrypted under their plain names.

    The plain text stays in this process (``status`` and ``check`` validate it as they do
    plain files); it is never printed.

    :returns: ``(files, Sealing)``; a file that does not decrypt is left out and named in
        ``Sealing.error``.
    """
    plain, sealed, kinds, errors = {}, [], [], []
    for name, data in current.items():
        if name not in _PLAIN:
            plain[name] = data
            continue
        sealed.append(name)
        kinds.append(key_kind(data) or "unknown key")
        try:
            text = _creds(runner, "decrypt", name, data)
        except SealingError as exc:
            errors.append(exc.message)
            continue
        plain[_PLAIN[name]] = text
    keys = ", ".join(sorted(set(kinds)))
    return plain, Sealing(tuple(sorted(sealed)), keys, "; ".join(errors) or None)


def decrypted(current: dict, context: str = "") -> tuple[dict, Sealing]:
    """:func:`open_set`, for those that need every file: a file that does not decrypt raises
    :class:`SealingError` (its message followed by ``context``)."""
    plain, info = open_set(current)
    if info.error:
        raise SealingError(info.error + context)
    return plain, info


def _plain_secrets(files) -> bool:
    method = method_of(files)
    return method is not None and any(name in files for name in SECRET_FILES[method])


def store(agent, files: dict, method: str, seal_it: bool, *, origin: str | None = None,
          environ: dict | None = None, runner: Runner | None = None,
          defer: Callable | None = None) -> list[str]:
    """Write ``files`` (plain, {name: (data, mode)}) through ``agent``, sealed if asked.

    :param origin: where the set comes from (``AgentDir.write``'s record).
    :param defer: ``defer(root, environ) -> reason | None``, :func:`deferral` by default
        (tests seal in a throw-away root).
    :returns: lines for the person (what was written, sealed or deferred).
    :raises SealingError: sealing was asked for where it cannot work, or failed.
    """
    if not seal_it:
        agent.write(files, origin=origin)
        agent.drop_record(PENDING)
        return [f"written: {', '.join(sorted(files))} in {agent.path}"]
    require(agent.root)
    later = (defer or deferral)(agent.root, environ)
    if later:
        agent.write(files, origin=origin)
        agent.save_record(PENDING, {"reason": later})
        return [f"written: {', '.join(sorted(files))} in {agent.path}",
                f"sealing deferred to the first boot ({later}): {SEAL_UNIT} seals the set "
                "with that machine's own key"]
    memo: dict = {}

    def sealed(some: dict, some_method: str) -> dict:
        key = tuple(sorted((name, data) for name, (data, _) in some.items()))
        if key not in memo:
            memo[key] = seal(some, some_method, runner)
        return memo[key]

    current = agent.current()
    written = sealed(files, method)
    # What is there becomes the previous generation: sealed too if it holds a plain secret,
    # else its own files (hard links). Encrypted before the write: a failure writes nothing.
    old = sealed(_with_modes(agent, current), method_of(current)) \
        if _plain_secrets(current) else None
    agent.write(written, origin=origin, previous=old)
    agent.drop_record(PENDING)
    kinds = sorted({key_kind(data) or "unknown key" for name, (data, _) in written.items()
                    if name in _PLAIN})
    return [f"written: {', '.join(sorted(written))} in {agent.path}",
            f"sealed with the {', '.join(kinds)}; the previous set is sealed too"]


def _with_modes(agent, files: dict, on_disk: bool = True) -> dict:
    """``{name: bytes}`` as ``{name: (data, mode)}``: the current files' modes (``on_disk``),
    else (and for a file not there) the documented ones."""
    modes = {Path(path).name: mode for path, mode in agent.modes().items()} if on_disk else {}
    default = {CERTIFICATE_FILE: 0o644}
    return {name: (data, modes.get(name, default.get(name, 0o600)))
            for name, data in files.items()}


def plain_left(agent, current: dict | None = None) -> list[str]:
    """The plain secret files in the previous generation of a sealed set; ``[]`` if none.
    ``current``: the current files, when the caller has just read them."""
    if not any(name in _PLAIN for name in (agent.current() if current is None else current)):
        return []
    try:
        previous = agent.previous_files()
    except SetupError:  # unsafe or unreadable: rollback refuses it with the reason
        return []
    return sorted(set(SECRET_FILES.get(method_of(previous), ())) & set(previous))


def seal_previous(agent, runner: Runner | None = None) -> list[str]:
    """Seal the plain secrets left in a sealed set's previous generation where they are
    (the current set and its origin untouched); lines for the person."""
    previous = agent.previous_files()
    old = seal(_with_modes(agent, previous, on_disk=False), method_of(previous), runner)
    agent.write(_with_modes(agent, agent.current()), origin=agent.origin() or "seal",
                previous=old)
    return [f"written: {', '.join(sorted(old))} in the previous generation, sealed",
            "the current set was sealed already; no plain copy is left"]
