"""defender_setup.sealing, the pure part: which keys seal a file, refusals, deferral.

Sealing through systemd-creds (a fake first on PATH) is in tests/functional/test_sealing.py;
the real one runs in the integration tests, in booted containers.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from defender_setup import sealing
from defender_setup.agentdir import AgentDir
from defender_setup.credentials import CONNECTION_STRING_FILE
from tests.fakes import HOST, HOST_AND_TPM2, debian12, seal_here


@pytest.mark.parametrize("header, kind", [
    (HOST, "host key"),
    (HOST_AND_TPM2, "TPM2 + host key"),
    ("0c7cc07b117645919c4b0bea08bc20fe", "TPM2"),
    ("00" * 16, None),
])
def test_key_kind_reads_systemds_header(header, kind):
    blob = base64.b64encode(bytes.fromhex(header) + b"\x00" * 40)
    wrapped = b"\n".join(blob[i:i + 20] for i in range(0, len(blob), 20))
    assert sealing.key_kind(wrapped) == kind
    assert sealing.key_kind(b"not base64 at all!") is None


def test_refused_below_systemd_250_with_one_line(root):
    (root / "lib/systemd").mkdir(parents=True)
    (root / "lib/systemd/libsystemd-shared-247.so").touch()
    reason = sealing.refusal(root)
    assert "systemd 250 or later" in reason and "systemd 247" in reason
    assert "\n" not in reason
    debian12(root)
    assert sealing.refusal(root) is None
    assert "not installed" in sealing.refusal(root / "empty")


def test_deferred_in_chroots_and_image_builds(root):
    assert "DPKG_ROOT" in sealing.deferral("/", {"DPKG_ROOT": str(root)})
    assert "not the running system" in sealing.deferral(root, {})


def test_deferred_sealing_writes_plain_files_and_a_record(root, sas_inputs):
    debian12(root)  # a Debian 12 tree, not the running system
    validated = sas_inputs.validated()
    lines = sealing.store(AgentDir(root), validated.files, validated.method, True, environ={})
    agent = AgentDir(root)
    assert set(agent.current()) == {CONNECTION_STRING_FILE}
    assert agent.record(sealing.PENDING) == {"reason": f"{root} is not the running system"}
    assert "deferred to the first boot" in lines[-1] and sealing.SEAL_UNIT in lines[-1]
    sealing.store(agent, validated.files, validated.method, False)
    assert agent.record(sealing.PENDING) is None


def test_refusal_changes_nothing(root, sas_inputs):
    validated = sas_inputs.validated()
    with pytest.raises(sealing.SealingError) as raised:
        sealing.store(AgentDir(root), validated.files, validated.method, True, defer=seal_here)
    assert raised.value.exit_code == 78
    assert not root.exists()


def test_stderr_lines_name_the_problem_without_the_content():
    class Proc:
        returncode, stdout = 1, b""
        stderr = b"Credential secret file is not located on encrypted media\nTPM2 busy\n"

    with pytest.raises(sealing.SealingError,
                       match=r"^credential sealing: connection_string\.txt\.cred cannot be sealed: "
                             r"TPM2 busy$"):
        sealing.seal({CONNECTION_STRING_FILE: (b"SECRET", 0o600)}, "connection-string",
                     runner=lambda argv, data: Proc())



def unit_directives(name: str) -> list[str]:
    debian = Path(__file__).resolve().parents[2] / "debian"
    # The runtime's units are defender-setup-agent's, the others defender-setup's.
    path = next(p for package in ("defender-setup", "defender-setup-agent")
                if (p := debian / f"{package}.{name}.service").exists())
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_unit_that_rolls_back_at_boot_can_reach_the_tpm():
    # Roll-back decrypts a sealed previous set (systemd-creds): with a TPM2 it opens
    # /dev/tpmrm0, which PrivateDevices=yes hides. The agent's unit needs no TPM itself
    # (PID 1 decrypts its credentials) and never rolls back.
    lines = unit_directives("defender-setup-import-verify")
    assert "PrivateDevices=yes" not in lines
    assert {"DevicePolicy=closed", "DeviceAllow=char-tpmrm rw"} <= set(lines)
    for name in ("defender-setup-seal", "defender-setup-import", "defender-setup-repair"):
        assert "PrivateDevices=yes" not in unit_directives(name)
