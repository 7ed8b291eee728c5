"""Real systemd in a container: Debian images built with mmdebstrap, booted with systemd-nspawn.

Interface (the fixtures in ``conftest.py`` wrap these; see docs/testing.md)::

    build_deb(revision=None, dist_dir=None) -> Path   # tools/build-deb, or $DEFENDER_SETUP_DEB
    debs(deb) -> [agent .deb, deb]                 # both binary packages of that build
    build_release(ref, dist_dir) -> Path           # an earlier release (git ref), its own build
    previous_version_ref() -> str                  # the tree before the last version bump
    base_image(extra=(), suite="bookworm") -> Path    # cached rootfs: systemd + dependencies
    build_image(dest, deb, preseed=(), files={}, extra=(), suite="bookworm")
    device_disk(layers, name) -> context manager yielding a copy-on-write rootfs (overlayfs)
    install_layer(base, deb, dest) -> CompletedProcess   # the .deb as an image layer
        # Recipe A: mmdebstrap installs the .deb in a chroot (no systemd, policy-rc.d 101)
        # with debconf answers and files (e.g. a key) put in place before the install
    Container(rootfs, name, volatile=True, binds={host: guest}, credentials={id: host file},
              nspawn_args=[...]).start() -> Container
        # credentials: systemd credentials for the container's PID 1 (--load-credential=,
        # read from a host file: never a value on a command line)
        .run(cmd, input=None, check=True, timeout=120) -> CompletedProcess (text, both pipes)
        .sh(script, **kw)                     # run(["sh", "-ec", script])
        .copy_in(data_or_path, dest, mode=0o600)   # through stdin: never on a command line
        .preseed(lines)                       # debconf-set-selections inside
        .install_deb(preseed=(), frontend="noninteractive", check=True)
        .show(unit, *props) -> dict           # systemctl show -p ...
        .stop()

    A Container is a context manager; ``--volatile=overlay`` (the default) keeps the cached
    rootfs untouched, so every test starts from the same image and leaks nothing.

Everything runs as root on the host; machine names start with ``deb-`` (the package tests)
unless the caller passes its own prefix. Secrets go in through ``input=``/``copy_in``, never
through argv.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DEFENDER_SETUP_CACHE", "/var/tmp/defender-setup-cache"))
SUITE = "bookworm"
# What the .deb depends on plus an init: installing the .deb then needs no network.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "debconf", "python3",
                 "python3-cryptography", "python3-systemd", "python3-debconf",
                 "python3-paho-mqtt", "procps", "apt-utils")
RECIPE_VERSION = "1"  # bump to invalidate cached images when the recipe changes
GUEST_DEB_DIR = "/srv/deb"
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    kw.setdefault("capture_output", True)
    return subprocess.run(cmd, **kw)


def build_deb(revision: int | None = None, dist_dir: Path | None = None) -> Path:
    """The package under test: ``$DEFENDER_SETUP_DEB`` if set, else built by tools/build-deb.

    :param revision: build this Debian revision instead (e.g. 2, to test an upgrade), into
        ``dist_dir``.
    """
    given = os.environ.get("DEFENDER_SETUP_DEB")
    if given and revision is None:
        return Path(given).resolve()
    env = dict(os.environ)
    if revision is not None:
        env.update(DEB_REVISION=str(revision), DEB_DIST_DIR=str(dist_dir))
    out = _run([str(REPO / "tools" / "build-deb")], cwd=REPO, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"tools/build-deb failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def debs(deb: Path) -> list[Path]:
    """Both binary packages of one build: ``deb`` (defender-setup's, the path the fixtures
    pass around) and defender-setup-agent's beside it, when there is one (a release before
    the split has none). The agent comes first: dpkg -i unpacks in this order."""
    deb = Path(deb)
    agent = deb.with_name(deb.name.replace("defender-setup_", "defender-setup-agent_", 1))
    return [agent, deb] if agent != deb and agent.exists() else [deb]


def previous_version_ref() -> str:
    """The tree just before the last change of ``__version__``: the previous release, in
    this history whatever was merged since (a branch's base, or main after the merge)."""
    bump = _run(["git", "-C", str(REPO), "log", "-n1", "--format=%H", "-G^__version__ = ",
                 "--", "defender_setup/__init__.py"]).stdout.strip()
    if not bump:
        raise RuntimeError("no commit changed __version__: no previous release to build")
    return f"{bump}^"


def build_release(ref: str, dist_dir: Path) -> Path:
    """A released tree (a git ref, e.g. ``main`` before the package split) built with its own
    tools/build-deb into ``dist_dir``: the previous release, for upgrade tests."""
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        archive = _run(["git", "-C", str(REPO), "archive", "--format=tar", ref],
                       text=False)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {ref} failed: {archive.stderr[-2000:]}")
        subprocess.run(["tar", "-C", tmp, "-xf", "-"], input=archive.stdout, check=True)
        out = _run([str(Path(tmp) / "tools" / "build-deb")], cwd=tmp,
                   env=dict(os.environ, DEB_DIST_DIR=str(dist_dir)))
        if out.returncode != 0:
            raise RuntimeError(f"build-deb of {ref} failed:\n{out.stderr[-4000:]}")
        return Path(out.stdout.strip().splitlines()[-1])


@contextmanager
def _lock(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # other sessions build the same image: wait
        yield


def base_image(extra: tuple[str, ...] = (), suite: str = SUITE) -> Path:
    """A cached rootfs directory with systemd and the package's dependencies.

    Keyed by the suite and the package list, so a caller that needs more (``extra``) or
    another release (``suite="bullseye"``, ``"trixie"``) gets its own image.
    Never modify it: boot it with ``volatile=True`` or copy it.
    """
    packages = tuple(sorted(set(BASE_PACKAGES) | set(extra)))
    key = hashlib.sha256(f"{RECIPE_VERSION} {suite} {' '.join(packages)}".encode())
    path = CACHE / f"base-{suite}-{key.hexdigest()[:12]}"
    with _lock(path.name):
        if (path / "etc" / "os-release").exists():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=CACHE))
        try:
            _mmdebstrap(tmp, ["--quiet", "--include=" + ",".join(packages)], suite)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def _mmdebstrap(dest: Path, options: list[str], suite: str = SUITE
                ) -> subprocess.CompletedProcess:
    if dest.exists():
        dest.rmdir()  # mmdebstrap wants an absent or empty directory; mkdtemp made it empty
    result = _run(["mmdebstrap", "--variant=apt", *options, suite, str(dest)],
                  timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def build_image(dest: Path, deb: Path, preseed=(), files: dict | None = None,
                extra: tuple[str, ...] = (), suite: str = SUITE) -> subprocess.CompletedProcess:
    """Recipe A: an image with the .deb installed unattended in a chroot.

    :param preseed: debconf-set-selections lines, applied before the package is installed.
    :param files: ``{guest path: bytes}`` written (mode 0600) before the install, e.g. the
        certificate and key the answers point at. They travel through files in a private
        temporary directory and mmdebstrap's ``copy-in``, never through a command line.
    :returns: mmdebstrap's result (its stderr holds the maintainer scripts' messages).
    """
    files = files or {}
    packages = ",".join(sorted(set(BASE_PACKAGES) | set(extra)))
    with tempfile.TemporaryDirectory(prefix="deb-image-") as tmp:
        os.chmod(tmp, 0o700)
        seeds = Path(tmp) / "preseed"
        seeds.write_text("".join(line + "\n" for line in preseed))
        hooks = [f'--essential-hook=chroot "$1" debconf-set-selections < {seeds}']
        for number, (guest, data) in enumerate(files.items()):
            local = Path(tmp) / f"file{number}"
            local.write_bytes(data)
            local.chmod(0o600)
            parent = str(Path(guest).parent)
            hooks.append(f'--essential-hook=mkdir -p "$1{parent}"')
            hooks.append(f"--essential-hook=copy-in {local} {parent}")
            hooks.append(f'--essential-hook=mv "$1{parent}/{local.name}" "$1{guest}"')
        # --verbose: the maintainer scripts' messages are part of what the tests check.
        both = ",".join(map(str, debs(deb)))
        return _mmdebstrap(Path(dest), ["--verbose", f"--include={packages},{both}",
                                        "--hook-dir=/usr/share/mmdebstrap/hooks/"
                                        "file-mirror-automount", *hooks], suite)


@contextmanager
def device_disk(layers, name: str, keep_upper: Path | None = None):
    """A copy-on-write disk over read-only ``layers`` (overlayfs on the host, topmost first):
    what one device flashed from a golden image is. Unlike ``--volatile=overlay`` it survives
    a reboot (stop, then start again on the same directory); it is thrown away on exit,
    except the changes when ``keep_upper`` names where to keep them (a new image layer)."""
    layers = [layers] if isinstance(layers, (str, Path)) else list(layers)
    base = CACHE / "devices" / f"{name}-{uuid.uuid4().hex[:6]}"
    upper, work, merged = keep_upper or base / "upper", base / "work", base / "rootfs"
    for directory in (upper, work, merged):
        directory.mkdir(parents=True, exist_ok=directory is upper)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}",
                    str(merged)], check=True, capture_output=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def install_layer(base: Path, deb: Path, dest: Path) -> subprocess.CompletedProcess:
    """An image layer: ``deb`` installed over ``base`` with dpkg, as an image build does it (no
    systemd running, no answers); the changes land in ``dest`` (use ``[dest, base]`` as the
    layers of :func:`device_disk`). Seconds, where a fresh mmdebstrap takes minutes."""
    with device_disk(base, "layer", keep_upper=dest) as merged:
        return _run(["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(merged),
                     f"--bind-ro={deb.parent}:{GUEST_DEB_DIR}", "--timezone=off",
                     "env", "-i", f"PATH={GUEST_PATH}", "DEBIAN_FRONTEND=noninteractive",
                     "dpkg", "-i", *(f"{GUEST_DEB_DIR}/{d.name}" for d in debs(deb))],
                    timeout=300)


CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # still busy, or already gone: a leftover empty directory is harmless
        pass


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """One booted systemd-nspawn container; see the module docstring."""

    def __init__(self, rootfs: Path, name: str | None = None, volatile: bool = True,
                 binds: dict | None = None, prefix: str = "deb",
                 credentials: dict | None = None, nspawn_args=()):
        self.rootfs = Path(rootfs)
        self.name = name or f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.volatile = volatile
        self.binds = dict(binds or {})
        self.credentials = dict(credentials or {})
        self.nspawn_args = list(nspawn_args)
        self.pid1: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log = CACHE / "logs" / f"{self.name}.log"

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> Container:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-M", self.name,
               "-D", str(self.rootfs), "-b", "--console=pipe"]
        if self.volatile:
            cmd.append("--volatile=overlay")
        cmd += [f"--bind-ro={host}:{guest}" for host, guest in self.binds.items()]
        cmd += [f"--load-credential={cid}:{path}" for cid, path in self.credentials.items()]
        cmd += self.nspawn_args
        # The shell joins the container's own cgroups, then becomes nspawn (no preexec_fn:
        # containers are started from threads).
        procs = " ".join(str(path / "cgroup.procs") for path in self._own_cgroups())
        cmd = ["sh", "-c", 'for f in $1; do echo $$ > "$f"; done; shift; exec "$@"', "sh",
               procs, *cmd]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            self.pid1 = self._find_pid1()
            if self.pid1 is None:
                self._check_alive()
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name}: no systemd after {timeout}s; "
                                       f"see {self.log}")
                time.sleep(0.1)
        while True:
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(1, deadline - time.monotonic())).stdout.strip()
            if state in ("running", "degraded"):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: system state {state!r}; see {self.log}")
            time.sleep(0.2)

    def _own_cgroups(self) -> list[Path]:
        """A cgroup of its own in each systemd hierarchy. Without systemd on the host, nspawn
        --keep-unit puts every container in the caller's cgroup: containers booted at the
        same time then share /payload/system.slice/... and their units fail at random with
        219/CGROUP."""
        made = []
        for hierarchy in CGROUP_HIERARCHIES:
            if (hierarchy / "cgroup.procs").exists():
                path = hierarchy / "defender-setup-tests" / self.name
                path.mkdir(parents=True, exist_ok=True)
                made.append(path)
        self.cgroups = made
        return made

    def _drop_cgroups(self) -> None:
        for path in getattr(self, "cgroups", []):
            for sub in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
                _rmdir(sub)
            _rmdir(path)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: systemd-nspawn exited {self.proc.returncode}; "
                               f"see {self.log}:\n{self.log.read_text(errors='replace')[-2000:]}")

    def _find_pid1(self) -> int | None:
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                if _comm(child) == "systemd":
                    return child
                todo.append(child)
        return None

    def stop(self, timeout: float = 30) -> None:
        """Power off (SIGRTMIN+4 to its systemd) and wait; kill the nspawn we started if stuck."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid1:
            try:
                os.kill(self.pid1, signal.SIGRTMIN + 4)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        self.pid1 = None  # a later start() boots it again (a reboot, on a persistent rootfs)
        self._drop_cgroups()

    def __enter__(self) -> Container:
        return self if self.pid1 else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inside -----------------------------------------------------------------------------
    def run(self, cmd, input: str | bytes | None = None, check: bool = True,
            timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a list, or a string for ``sh -c``) inside, with a clean environment."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        variables = {"PATH": GUEST_PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        full = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i",
                *(f"{k}={v}" for k, v in variables.items()), *cmd]
        binary = isinstance(input, bytes)
        result = subprocess.run(full, input=input, capture_output=True, timeout=timeout,
                                text=not binary, errors=None if binary else "replace")
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {cmd!r} exited {result.returncode}\n"
                                 f"stdout: {_text(result.stdout)}\nstderr: {_text(result.stderr)}")
        return result

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-ec", script], **kw)

    def copy_in(self, data: bytes | str | Path, dest: str, mode: int = 0o600) -> None:
        """Write ``data`` (bytes, or a host file's content) to ``dest`` inside, via stdin."""
        if isinstance(data, Path):
            data = data.read_bytes()
        if isinstance(data, str):
            data = data.encode()
        self.run(["sh", "-ec", 'mkdir -p "$(dirname "$1")"; umask 077; cat > "$1"; '
                  'chmod "$2" "$1"', "copy-in", dest, f"{mode:o}"], input=data)

    def read(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def preseed(self, lines) -> None:
        self.run(["debconf-set-selections"], input="".join(f"{line}\n" for line in lines))

    def install_deb(self, preseed=(), frontend: str = "noninteractive", check: bool = True,
                    deb: str | None = None, input: str | None = None,
                    ) -> subprocess.CompletedProcess:
        """``apt-get install`` the bound .debs (see :func:`booted`; ``deb``: defender-setup's
        elsewhere in the guest, with its defender-setup-agent beside it), after preseeding."""
        if preseed:
            self.preseed(preseed)
        found = [deb] if deb else self.guest_debs()
        if deb:
            agent = deb.replace("defender-setup_", "defender-setup-agent_", 1)
            found += [agent] if agent != deb and self.exists(agent) else []
        return self.run(["apt-get", "install", "-y", "--no-install-recommends", *found],
                        env={"DEBIAN_FRONTEND": frontend}, check=check, input=input,
                        timeout=300)

    def guest_debs(self) -> list[str]:
        """The bound build's packages: defender-setup and defender-setup-agent."""
        found = self.run(["sh", "-c", f"ls {GUEST_DEB_DIR}/*.deb"]).stdout.split()
        assert len(found) == 2, found
        return found

    def show(self, unit: str, *props: str) -> dict:
        out = self.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return (value or "")[-3000:]
