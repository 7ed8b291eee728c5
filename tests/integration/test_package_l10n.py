"""The translated debconf questions (debian/po) on a German system: LANG=de_DE.UTF-8.

The image has Debian's ``locales`` with de_DE.UTF-8 generated (as ``dpkg-reconfigure locales``
would), so debconf picks the German templates and whiptail draws their umlauts. A preseeded
install must work as in English; the dialog must ask the German questions and configure.
"""

from __future__ import annotations

import harness
import pytest
from conftest import AGENT_DIR, UNIT
from test_package import VERDICT
from test_package_dialog import Screen

GERMAN = {"LANG": "de_DE.UTF-8"}
PACKAGES = ("locales", "whiptail")


class Utf8Screen(Screen):
    """tmux told that the terminal is UTF-8 (-u), whatever the test's own locale is."""

    def tmux(self, args, **kw):
        return super().tmux(["-u", *args], **kw)


@pytest.fixture
def german(boot):
    ct = boot(harness.base_image(extra=PACKAGES))
    ct.sh("sed -i 's/^# *de_DE.UTF-8 UTF-8/de_DE.UTF-8 UTF-8/' /etc/locale.gen; locale-gen",
          timeout=120)
    assert "de_DE.utf8" in ct.run(["locale", "-a"]).stdout
    return ct


def test_preseeded_install_under_a_german_locale(german, preseed):
    german.preseed(preseed.for_connection_string())
    result = german.run(["apt-get", "install", "-y", "--no-install-recommends",
                         *german.guest_debs()], env={**GERMAN, "DEBIAN_FRONTEND": "noninteractive"},
                        timeout=300)
    out = result.stdout + result.stderr
    assert "defender-setup (" in out and "wird eingerichtet" in out, out  # dpkg speaks German
    assert VERDICT in out, out
    assert german.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert preseed.sas_key() in german.read(f"{AGENT_DIR}/connection_string.txt")


def test_dialog_asks_in_german_and_configures(german, preseed):
    german.install_deb()
    good = preseed.connection_string(key=preseed.sas_key(23))
    screen = Utf8Screen(["nsenter", "-t", str(german.pid1), "-a", "env", "-i",
                         f"PATH={harness.GUEST_PATH}", "LANG=de_DE.UTF-8", "TERM=xterm",
                         "dpkg-reconfigure", "-fdialog", "defender-setup"])
    try:
        text = screen.wait_for("Authentifizierungsmethode für den Micro-Agent")
        assert "später konfigurieren" in text and "X.509-Zertifikat" in text, text
        assert "Authentication method" not in text
        screen.keys("Home", "Enter")                    # the connection string
        screen.wait_for("Verbindungszeichenfolge des Moduls")
        screen.paste(good)
        screen.keys("Enter")
        screen.wait_for("Installation als fehlgeschlagen werten")
        screen.keys("Enter")                            # strict verification: no
        screen.wait_for("Neue Anmeldedaten vor dem Schreiben am IoT Hub ausprobieren?")
        screen.keys("Enter")                            # the hub probe: yes
        screen.wait_for("Die geheimen Dateien mit dem Schlüssel dieses Rechners versiegeln?")
        screen.keys("Enter")                            # sealing: no
        text = screen.wait_for("EXIT=", timeout=90, history=True)
        assert "EXIT=0" in text and VERDICT in text, text
        assert preseed.sas_key(23) not in text
    finally:
        screen.close()
    assert preseed.sas_key(23) in german.read(f"{AGENT_DIR}/connection_string.txt")
