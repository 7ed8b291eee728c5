"""target.detect: which agent is installed (from the dpkg database under root), hence which
directory; the Debian version order it relies on."""

from __future__ import annotations

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.target import (
    MICROSOFT_PACKAGE,
    OUR_PACKAGE,
    compare_versions,
    detect,
)


def dpkg_status(root, *stanzas):
    path = root / "var/lib/dpkg/status"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(stanzas))


def stanza(package, version, status="install ok installed", provides=""):
    extra = f"Provides: {provides}\n" if provides else ""
    return (f"Package: {package}\nStatus: {status}\nPriority: optional\n{extra}"
            f"Version: {version}\nDescription: x\n")


def test_no_dpkg_database_means_our_runtime_in_var(tmp_path):
    target = detect(tmp_path)
    assert (target.package, target.microsoft, target.agent_dir, target.cache) == (
        OUR_PACKAGE, False, "var/defender_iot_micro_agent", None)


def test_our_runtime_is_found_by_its_package_not_by_the_name_it_provides(tmp_path):
    dpkg_status(tmp_path, stanza("python3", "3.11.2-1"),
                stanza(OUR_PACKAGE, "0.2.0-1", provides=MICROSOFT_PACKAGE))
    target = detect(tmp_path)
    assert (target.package, target.version, target.microsoft) == (OUR_PACKAGE, "0.2.0-1",
                                                                   False)
    assert "defender-setup's runtime" in target.describe()


@pytest.mark.parametrize("version, directory", [
    ("4.1.2", "etc/defender_iot_micro_agent"),
    ("4.2.10-1", "etc/defender_iot_micro_agent"),
    ("4.1.1", "var/defender_iot_micro_agent"),
    ("4.1.2~rc1", "var/defender_iot_micro_agent"),
    ("3.13.1", "var/defender_iot_micro_agent"),
])
def test_microsofts_agent_reads_etc_from_4_1_2_on(tmp_path, version, directory):
    dpkg_status(tmp_path, stanza(MICROSOFT_PACKAGE, version))
    target = detect(tmp_path)
    assert target.microsoft and target.agent_dir == directory
    assert target.cache == "var/lib/defender_iot_micro_agent/cache.json"
    assert target.describe() == f"Microsoft's defender-iot-micro-agent {version}"
    assert AgentDir(tmp_path).path == tmp_path / directory  # every command asks the same


def test_a_removed_microsoft_agent_with_its_configuration_left_is_not_the_target(tmp_path):
    dpkg_status(tmp_path, stanza(MICROSOFT_PACKAGE, "4.1.2",
                                 status="deinstall ok config-files"))
    assert not detect(tmp_path).microsoft


@pytest.mark.parametrize("a, b, expected", [
    ("4.1.2", "4.1.2", 0), ("4.1.1", "4.1.2", -1), ("4.1.10", "4.1.2", 1),
    ("4.1.2-1", "4.1.2", 1), ("4.1.2~rc1", "4.1.2", -1), ("1:0.1", "4.1.2", 1),
    ("4.1.2+b1", "4.1.2", 1), ("4.1.2a", "4.1.2", 1), ("4.1.2.0", "4.1.2", 1),
])
def test_debian_version_order(a, b, expected):
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_the_maintainer_scripts_ask_the_same_place(tmp_path, capsys):
    """debconf-helper agent-dir: the directory the config script and postinst test."""
    from defender_setup.debconf_bridge import main

    assert main(["agent-dir", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "var/defender_iot_micro_agent")
    dpkg_status(tmp_path, stanza(MICROSOFT_PACKAGE, "4.1.2"))
    assert main(["agent-dir", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "etc/defender_iot_micro_agent")
