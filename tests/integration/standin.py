"""A stand-in for Microsoft's ``defender-iot-micro-agent`` package, built at test time.

Interface::

    deb = build_standin(directory, version="4.1.2")   # Path of the .deb (dpkg-deb)

Microsoft's repository cannot be reached from the test machines, so the booted tests install
this instead. It follows the layout Microsoft documents for its agent from 4.1.2 on, and only
that: package and unit ``defender-iot-micro-agent`` (running as root), credentials in
``/etc/defender_iot_micro_agent`` (``connection_string.txt``, ``certificate_public.pem``,
``certificate_private.pem``), settings in ``conf.json`` there, its settings cache
``/var/lib/defender_iot_micro_agent/cache.json`` (written from ``conf.json`` when absent, read
otherwise: a stale cache shows). Its "agent" stays up while the connection string is present
and well formed, and exits 1 (as a refused identity would end it) when the device id starts
with ``refused``. It never talks to a hub and reports no status text, as Microsoft's agent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

AGENT = r"""#!/bin/sh
# Stand-in for Microsoft's micro agent (tests only): checks the documented files, then idles.
DIR=/etc/defender_iot_micro_agent
CACHE_DIR=/var/lib/defender_iot_micro_agent
cs=$DIR/connection_string.txt
[ -f "$cs" ] || { echo "stand-in: no $cs" >&2; exit 1; }
text=$(cat "$cs")
case "$text" in
    *HostName=*DeviceId=*) ;;
    *) echo "stand-in: malformed connection string" >&2; exit 1 ;;
esac
case "$text" in
    *DeviceId=refused*) echo "stand-in: the hub refused the identity" >&2; exit 1 ;;
esac
case "$text" in
    *x509=true*)
        [ -f "$DIR/certificate_public.pem" ] && [ -f "$DIR/certificate_private.pem" ] ||
            { echo "stand-in: certificate files missing" >&2; exit 1; } ;;
    *SharedAccessKey=*) ;;
    *) echo "stand-in: no key in the connection string" >&2; exit 1 ;;
esac
mkdir -p "$CACHE_DIR"
if [ -f "$CACHE_DIR/cache.json" ]; then
    echo "stand-in: settings from the cache"
elif [ -f "$DIR/conf.json" ]; then
    cp "$DIR/conf.json" "$CACHE_DIR/cache.json"
    echo "stand-in: settings read from conf.json"
else
    echo '{}' >"$CACHE_DIR/cache.json"
fi
echo "stand-in: running as uid $(id -u)"
exec sleep infinity
"""

UNIT = """[Unit]
Description=Defender for IoT micro agent (test stand-in for Microsoft's package)
After=network-online.target

[Service]
ExecStart=/usr/bin/defender-iot-micro-agent-standin
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    deb-systemd-helper enable defender-iot-micro-agent.service >/dev/null || true
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
"""

CONTROL = """Package: defender-iot-micro-agent
Version: {version}
Architecture: all
Maintainer: defender-setup tests <tests@example.org>
Depends: systemd
Description: test stand-in for Microsoft's Defender for IoT micro agent
 Built by defender-setup's integration tests to Microsoft's documented layout.
"""


def build_standin(directory: Path, version: str = "4.1.2") -> Path:
    """Build the stand-in package into ``directory``; return the .deb's path."""
    tree = Path(directory) / f"standin-{version}"
    files = {
        "DEBIAN/control": (CONTROL.format(version=version), 0o644),
        "DEBIAN/postinst": (POSTINST, 0o755),
        "DEBIAN/conffiles": ("/etc/defender_iot_micro_agent/conf.json\n", 0o644),
        "usr/bin/defender-iot-micro-agent-standin": (AGENT, 0o755),
        "lib/systemd/system/defender-iot-micro-agent.service": (UNIT, 0o644),
        "etc/defender_iot_micro_agent/conf.json": ("{}\n", 0o644),
    }
    for name, (text, mode) in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    for sub in ("DEBIAN", "etc/defender_iot_micro_agent", "usr/bin", "lib/systemd/system"):
        (tree / sub).chmod(0o755)
    deb = Path(directory) / f"defender-iot-micro-agent_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb
