"""The dialog frontend (whiptail), driven like a person would: keys into a private tmux server.

``dpkg-reconfigure -fdialog`` runs inside the booted container on a pseudo-terminal that tmux
provides on the host; the test reads the screen with ``capture-pane`` and answers with
``send-keys``. Secrets are pasted from a tmux buffer loaded through standard input, not typed
on a command line.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import harness
import pytest
from conftest import AGENT_DIR
from test_package import VERDICT, assert_no_leak

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Screen:
    """A private tmux server (``-L``) running one command in a 120x40 terminal."""

    def __init__(self, command: list[str]):
        self.socket = f"deb-dialog-{uuid.uuid4().hex[:8]}"
        self.tmux(["new-session", "-d", "-x", "120", "-y", "40",
                   " ".join(command) + "; echo EXIT=$?; sleep 600"])

    def tmux(self, args, **kw):
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True,
                              capture_output=True, text=True, **kw)

    def text(self, history: bool = False) -> str:
        """The visible screen (what a person sees now), or with its scroll-back history."""
        return self.tmux(["capture-pane", "-p", "-J", *(["-S", "-500"] if history else [])]
                         ).stdout

    def wait_for(self, needle: str, timeout: float = 30, history: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(history)
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} did not appear; screen:\n{text}")
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        self.tmux(["send-keys", *keys])

    def paste(self, secret: str) -> None:
        self.tmux(["load-buffer", "-"], input=secret)
        self.tmux(["paste-buffer", "-d"])

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def reconfigure_on_screen(ct) -> Screen:
    """``dpkg-reconfigure -fdialog defender-setup`` inside ``ct``, on a private tmux screen."""
    return Screen(["nsenter", "-t", str(ct.pid1), "-a", "env", "-i",
                   f"PATH={harness.GUEST_PATH}", "LANG=C.UTF-8", "TERM=xterm",
                   "dpkg-reconfigure", "-fdialog", "defender-setup"])


def enter_connection_string(screen: Screen, text: str) -> None:
    """From the first question: the connection-string method, then ``text`` (pasted)."""
    screen.wait_for("Authentication method")
    screen.keys("Home", "Enter")                         # connection string
    screen.wait_for("Module connection string")
    screen.paste(text)
    screen.keys("Enter")


def test_dialog_reasks_with_the_error_and_goes_back(boot, preseed):
    ct = boot(harness.base_image(extra=("whiptail",)))
    ct.install_deb()
    key = preseed.sas_key(21)
    good = preseed.connection_string(key=key)
    bad = good.replace("SharedAccessKey=", "")  # the key pasted without its name
    screen = reconfigure_on_screen(ct)
    try:
        enter_connection_string(screen, bad)
        screen.wait_for("Fail the installation")
        screen.keys("Enter")                             # strict verification: default (no)
        screen.wait_for("Try the new credentials")
        screen.keys("Enter")                             # the hub probe: default (yes)
        screen.wait_for("Seal the secret files")
        screen.keys("Enter")                             # sealing: default (no)
        text = screen.wait_for("Invalid")                # the error names part and fix
        assert "SharedAccessKey=" in text and key[:8] not in text, text
        screen.keys("Enter")
        screen.wait_for("Module connection string")      # asked again...
        screen.keys("Escape")                            # ...back to the method
        screen.wait_for("Authentication method")
        screen.keys("Home", "Enter")
        screen.wait_for("Module connection string")
        screen.paste(good)
        screen.keys("Enter")
        screen.wait_for("Fail the installation")         # walking forward again
        screen.keys("Enter")
        screen.wait_for("Try the new credentials")
        screen.keys("Enter")
        screen.wait_for("Seal the secret files")
        screen.keys("Enter")
        text = screen.wait_for("EXIT=", timeout=90, history=True)
        assert "EXIT=0" in text and VERDICT in text, text
        assert key[:8] not in text
    finally:
        screen.close()
    assert "DeviceId=dev1" in ct.read(f"{AGENT_DIR}/connection_string.txt")
    assert_no_leak(ct, [key[:8]])  # the error shown is not kept in debconf's files
