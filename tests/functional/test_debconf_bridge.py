"""The debconf bridge through the real debconf protocol: the helper and the maintainer
scripts under debconf's frontend (perl), a private debconf database under a throw-away
DPKG_ROOT (``dpkg_root``), and the hub probe against the SAS test hub."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from defender_setup.agentdir import AgentDir
from defender_setup.credentials import CONNECTION_STRING_FILE
from tests.fakes import debian12
from tests.offers import ANSWER_CS as CS
from tests.offers import ANSWER_KEY as KEY

REPO = Path(__file__).resolve().parents[2]

# -- the real debconf protocol ---------------------------------------------------------------
DEBCONF_CONF = """\
Config: configdb
Templates: templatedb

Name: config
Driver: File
Mode: 644
Reject-Type: password
Filename: /debconf/config.dat

Name: passwords
Driver: File
Mode: 600
Backup: false
Accept-Type: password
Filename: /debconf/passwords.dat

Name: configdb
Driver: Stack
Stack: config, passwords

Name: templatedb
Driver: File
Mode: 644
Filename: /debconf/templates.dat
"""

# Like the real config script, capture what the helper prints on standard output (the
# confmodule points the script's own standard output at stderr), here into $RESULT.
SCRIPT = """\
#!/bin/sh
set -e
. /usr/share/debconf/confmodule
rc=0
out=$(/usr/bin/python3 -c 'import sys; from defender_setup.debconf_bridge import main; \
sys.exit(main(sys.argv[1:]))' "$@") || rc=$?
printf '%s' "$out" > "$RESULT"
exit $rc
"""

INSTALLED_HELPER = "/usr/lib/defender-setup/debconf-helper"
HELPER = """\
#!/bin/sh
exec /usr/bin/python3 -c 'import sys; from defender_setup.debconf_bridge import main; \
sys.exit(main(sys.argv[1:]))' "$@"
"""


@pytest.fixture
def dpkg_root(tmp_path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


# What the debconf fixture runs: perl and debconf's tools, then our scripts under the frontend.
DEBCONF = ("perl", "debconf-set-selections", "debconf-show", "defender-setup.config",
           "defender-setup.postinst")


@pytest.fixture
def debconf(dpkg_root, tmp_path):
    """A private debconf database under ``dpkg_root`` (DPKG_ROOT) with the package's templates."""
    if shutil.which("debconf-set-selections") is None:
        pytest.skip("debconf is not installed")
    db = dpkg_root / "debconf"
    db.mkdir()
    (db / "debconf.conf").write_text(DEBCONF_CONF)
    # Named like a maintainer script so the frontend derives the package name and loads
    # the templates lying next to it, as it does for the real postinst; the translatable
    # field names (_Description) become plain ones as po2debconf does at build time.
    script = db / "defender-setup.postinst"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    templates = (REPO / "debian" / "defender-setup.templates").read_text()
    # What po2debconf does at build time: translator comments (#) out, "_" marks off.
    templates = re.sub(r"(?m)^#.*\n", "", templates)
    (db / "defender-setup.templates").write_text(re.sub(r"(?m)^_+", "", templates))
    # DPKG_ROOT: debconf finds its configuration and databases under it, the config script
    # reads the agent directory under it, like in a DPKG_ROOT installation.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "DPKG_ROOT": str(dpkg_root), "DEBCONF_SYSTEMRC": "/debconf/debconf.conf",
           "DEBIAN_FRONTEND": "noninteractive", "PYTHONPATH": str(REPO),
           "HOME": str(tmp_path)}

    out = tmp_path / "helper.out"
    # What dpkg-preconfigure does before it runs the config script (debconf-loadtemplate,
    # from debconf-utils, is this same perl).
    subprocess.run(["perl", "-MDebconf::Db", "-MDebconf::Template", "-e",
                    "Debconf::Db->load; Debconf::Template->load($ARGV[0], 'defender-setup'); "
                    "Debconf::Db->save", str(db / "defender-setup.templates")],
                   env=env, check=True)

    class Runner:
        dir = db

        def preseed(self, lines):
            subprocess.run(["debconf-set-selections"], input="".join(f"{x}\n" for x in lines),
                           env=env, text=True, check=True)

        def helper(self, *args):
            result = subprocess.run([str(script), *args], env={**env, "RESULT": str(out)},
                                    text=True, capture_output=True)
            result.stdout = out.read_text()
            return result

        def script(self, path, *args, extra_env=None, input=None):
            return subprocess.run([str(path), *args],
                                  env={**env, "DEBCONF_PACKAGE": "defender-setup",
                                       **(extra_env or {})},
                                  text=True, capture_output=True, input=input, timeout=60)

        def config(self, *args, unpacked=False, **kwargs):
            """The real config script: as before unpacking (no helper installed), or with
            ``unpacked`` as debconf runs it again from the postinst, the helper installed
            (here: the bridge from this tree, in place of /usr/lib/defender-setup's)."""
            text = (REPO / "debian" / "defender-setup.config").read_text()
            if unpacked:
                wrapper = db / "debconf-helper"
                wrapper.write_text(HELPER)
                wrapper.chmod(0o755)
                text = text.replace(f"HELPER={INSTALLED_HELPER}\n", f"HELPER={wrapper}\n")
                assert str(wrapper) in text
            config = db / "defender-setup.config"
            config.write_text(text)
            config.chmod(0o755)
            return self.script(config, *args, **kwargs)

        def variables(self, question) -> dict:
            """The substitution variables debconf saved for a question in config.dat."""
            text = (db / "config.dat").read_text()
            stanza = next(s for s in text.split("\n\n") if f"Name: {question}\n" in s)
            found = re.findall(r"(?m)^ (\w+) = (.*)$", stanza.split("Variables:\n")[-1]) \
                if "Variables:" in stanza else []
            return dict(found)

        def get(self, question):
            out = subprocess.run(["debconf-show", "defender-setup"], env=env, text=True,
                                 capture_output=True, check=True).stdout
            for line in out.splitlines():
                name, _, value = line.lstrip("* ").partition(":")
                if name == f"defender-setup/{question}":
                    return value.strip()
            return None

        def database(self) -> bytes:
            return b"".join(p.read_bytes() for p in db.glob("*.dat*"))

    return Runner()


def _seed(question, kind, value):
    return f"defender-setup defender-setup/{question} {kind} {value}"


@pytest.mark.allow_subprocess(*DEBCONF)
def test_apply_writes_and_clears_the_secret(debconf, dpkg_root):
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", CS)])
    assert KEY.encode() in debconf.database()  # preseeded: sits in passwords.dat for now
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert KEY not in result.stderr + result.stdout
    written = AgentDir(dpkg_root).current()
    assert KEY.encode() in written[CONNECTION_STRING_FILE]
    assert AgentDir(dpkg_root).origin()["source"] == "debconf"
    assert KEY.encode() not in debconf.database()
    assert debconf.get("device-id") == "dev1"  # identity synced for dpkg-reconfigure


@pytest.mark.allow_subprocess(*DEBCONF)
def test_check_reports_question_field_and_reason_without_the_secret(debconf, dpkg_root):
    bad = CS.replace(KEY, "“" + KEY[:-4] + "!!!”")
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", bad)])
    result = debconf.helper("check", "--root", str(dpkg_root))
    assert result.returncode == 65
    question, field, reason = result.stdout.rstrip("\n").split("\t")
    assert question == "connection-string"
    assert reason and KEY[:-4] not in result.stdout + result.stderr
    assert not (dpkg_root / "var").exists()


@pytest.mark.allow_subprocess(*DEBCONF)
def test_apply_failure_changes_nothing_and_still_clears_the_secret(debconf, dpkg_root):
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", CS.replace("DeviceId=", "Dev="))])
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 65
    lines = [x for x in result.stderr.splitlines() if x.startswith("defender-setup")]
    assert len(lines) == 1 and lines[0].startswith("defender-setup: invalid "), result.stderr
    assert not (dpkg_root / "var").exists()
    assert KEY.encode() not in debconf.database()


@pytest.mark.allow_subprocess(*DEBCONF)
def test_config_noninteractive_invalid_preseed_leaves_it_to_the_postinst(debconf):
    """The real config script before unpacking (no helper): it cannot show the error, so it
    finishes quietly; failing would make debconf drop its changes and keep the secret."""
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", "HostName=x;" + KEY)])
    result = debconf.config("configure", "")
    assert result.returncode == 0, result.stderr
    assert KEY not in result.stderr + result.stdout
    # ...and the postinst's apply then fails with one line and clears the secret:
    failed = debconf.helper("apply", "--root", str(debconf.dir.parent))
    assert failed.returncode == 65
    lines = [x for x in failed.stderr.splitlines() if x.startswith("defender-setup")]
    assert len(lines) == 1 and "defender-setup/connection-string" in lines[0], failed.stderr
    assert KEY.encode() not in debconf.database()


@pytest.mark.allow_subprocess(*DEBCONF)
def test_config_empties_the_error_it_could_not_show(debconf):
    """Run from the postinst (the helper installed), noninteractive: the error cannot be
    shown, so none of it stays in config.dat, and the postinst's apply reports it."""
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", "HostName=x;" + KEY)])
    result = debconf.config("configure", "", unpacked=True)
    assert result.returncode == 0, result.stderr
    assert set(debconf.variables("defender-setup/invalid").values()) <= {""}


@pytest.mark.allow_subprocess(*DEBCONF)
def test_config_shows_the_error_then_empties_it(debconf):
    """Teletype, run from the postinst (the helper installed): a wrong answer is re-asked with
    the error, which is not kept in config.dat (the strict-verify question is below debconf's
    default priority here, so not asked)."""
    token = "TKOxREbXrjk6v8BC2aFKRg=="
    bad = f"HostName=h.azure-devices.net;DeviceId=d;ModuleId=m;{token}"
    debconf.preseed([_seed("probe-hub", "boolean", "false")])  # no network here
    result = debconf.config("configure", "", input=f"1\n{bad}\n{CS}\n", unpacked=True,
                            extra_env={"DEBIAN_FRONTEND": "teletype"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Invalid connection string") == 1, result.stdout
    assert set(debconf.variables("defender-setup/invalid").values()) <= {""}
    dump = (debconf.dir / "config.dat").read_bytes() + \
        (debconf.dir / "templates.dat").read_bytes()
    assert token[:8].encode() not in dump and KEY.encode() not in dump


@pytest.mark.allow_subprocess(*DEBCONF)
def test_config_without_answers_succeeds(debconf):
    result = debconf.config("configure", "")
    assert result.returncode == 0, result.stderr
    assert debconf.get("auth-method") == "later"


@pytest.mark.allow_subprocess(*DEBCONF)
def test_config_loads_current_identity(debconf, dpkg_root):
    agent = dpkg_root / "var" / "defender_iot_micro_agent"
    agent.mkdir(parents=True, mode=0o700)
    (agent / CONNECTION_STRING_FILE).write_text(CS.replace("dev1", "dev7") + "\n")
    # an upgrade: the installed helper says what is configured
    result = debconf.config("configure", "0.1.0", unpacked=True)
    assert result.returncode == 0, result.stderr
    assert debconf.get("auth-method") == "connection-string"
    assert debconf.get("device-id") == "dev7"
    assert KEY.encode() not in debconf.database()


# -- the hub probe through the real debconf protocol ------------------------------------------
@pytest.fixture
def test_hub(hub_pki, dpkg_root):
    """The SAS test hub, and conf.json under the dpkg_root (DPKG_ROOT) pointing the agent at it."""
    from tests.hubroot import configure, sas_hub

    broker = sas_hub(hub_pki)
    configure(dpkg_root, hub_pki, port=broker.port)
    yield broker
    broker.stop()


def _sas_answers(key: str, probe: str = "true"):
    from tests.hubroot import sas_text

    return [_seed("auth-method", "select", "connection-string"),
            _seed("connection-string", "password", sas_text(key=key).decode()),
            _seed("probe-hub", "boolean", probe)]


@pytest.mark.allow_subprocess(*DEBCONF)
def test_check_reasks_a_key_the_hub_refuses_with_its_answer(debconf, dpkg_root, test_hub):
    from tests.hubroot import WRONG_KEY

    debconf.preseed(_sas_answers(WRONG_KEY))
    result = debconf.helper("check", "--root", str(dpkg_root))
    assert result.returncode == 65
    question, field, reason = result.stdout.rstrip("\n").split("\t")
    assert (question, field) == ("connection-string", "connection string")
    assert reason.startswith("the hub refused this key (CONNACK 5, not authorized): likely a "
                             "wrong SharedAccessKey"), reason
    assert WRONG_KEY not in result.stdout + result.stderr
    assert test_hub.connections[-1].code == 5
    assert not (dpkg_root / "var").exists()
    # ... but the outcome is noted (root-only, on /run) for the postinst of the same run
    assert not (dpkg_root / "run/defender-setup/probe.json").exists()  # no /run: no note
    (dpkg_root / "run").mkdir()
    assert debconf.helper("check", "--root", str(dpkg_root)).returncode == 65
    count = len(test_hub.connections)
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 65 and "the hub refused this key" in result.stderr
    assert len(test_hub.connections) == count  # one CONNECT for the dpkg run
    assert not (dpkg_root / "var").exists()
    assert not (dpkg_root / "run/defender-setup/probe.json").exists()  # used once


@pytest.mark.allow_subprocess(*DEBCONF)
def test_apply_of_a_refused_key_fails_before_writing(debconf, dpkg_root, test_hub):
    from tests.hubroot import WRONG_KEY

    debconf.preseed(_sas_answers(WRONG_KEY))
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 65
    lines = [x for x in result.stderr.splitlines() if x.startswith("defender-setup: invalid")]
    assert len(lines) == 1, result.stderr
    assert result.stderr.count("the hub refused") == 1, result.stderr  # said once
    assert lines[0].startswith("defender-setup: invalid connection string: the hub refused this "
                               "key (CONNACK 5, not authorized): ")
    assert lines[0].endswith("(debconf question defender-setup/connection-string)")
    assert not (dpkg_root / "var").exists()
    assert WRONG_KEY.encode() not in debconf.database()  # cleared all the same


@pytest.mark.allow_subprocess(*DEBCONF)
def test_apply_of_an_accepted_key_writes_it(debconf, dpkg_root, test_hub):
    from tests.hubroot import KEY as HUB_KEY

    debconf.preseed(_sas_answers(HUB_KEY))
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert "defender-setup: probe: the hub accepted " in result.stderr
    assert HUB_KEY.encode() in AgentDir(dpkg_root).current()[CONNECTION_STRING_FILE]


@pytest.mark.allow_subprocess(*DEBCONF)
def test_probe_hub_false_writes_without_asking_the_hub(debconf, dpkg_root, test_hub):
    from tests.hubroot import WRONG_KEY

    debconf.preseed(_sas_answers(WRONG_KEY, probe="false"))
    assert debconf.helper("check", "--root", str(dpkg_root)).returncode == 0
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert "probe:" not in result.stderr
    assert test_hub.connections == []
    assert WRONG_KEY.encode() in AgentDir(dpkg_root).current()[CONNECTION_STRING_FILE]


@pytest.mark.allow_subprocess(*DEBCONF)
def test_unchanged_credentials_are_not_tried_again(debconf, dpkg_root, test_hub):
    # a second connection as the same identity would knock the running agent off the hub
    from tests.hubroot import KEY as HUB_KEY
    from tests.hubroot import sas_text, store, validated

    store(dpkg_root, validated(sas_text(key=HUB_KEY)))
    debconf.preseed(_sas_answers(HUB_KEY))
    assert debconf.helper("check", "--root", str(dpkg_root)).returncode == 0
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0 and "credentials unchanged" in result.stderr, result.stderr
    assert test_hub.connections == []


@pytest.mark.allow_subprocess(*DEBCONF)
def test_seal_credentials_answer_is_deferred_in_an_image_and_can_be_taken_back(debconf, dpkg_root):
    """DPKG_ROOT is an image build: sealing waits for the first boot (a record). Answering
    false later asks for nothing (a sealed set stays sealed); "defender-setup unseal" is the
    way back to plain files."""
    debian12(dpkg_root)
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", CS),
                     _seed("seal-credentials", "boolean", "true"),
                     _seed("probe-hub", "boolean", "false")])
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert "sealing deferred to the first boot (DPKG_ROOT is set" in result.stderr
    agent = AgentDir(dpkg_root)
    assert set(agent.current()) == {CONNECTION_STRING_FILE}
    assert agent.record("seal-pending") is not None
    debconf.preseed([_seed("seal-credentials", "boolean", "false")])
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert agent.record("seal-pending") is not None
    from defender_setup.cli import main

    assert main(["unseal", "--no-restart", "--root", str(dpkg_root)]) == 0
    assert agent.record("seal-pending") is None


@pytest.mark.allow_subprocess(*DEBCONF)
def test_unseal_is_not_undone_by_the_next_configure(debconf, dpkg_root):
    """The answer true is acted on once: after "defender-setup unseal", a later configure
    (an upgrade, a noninteractive dpkg-reconfigure) with nothing new to say keeps it plain."""
    debian12(dpkg_root)
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", CS),
                     _seed("seal-credentials", "boolean", "true"),
                     _seed("probe-hub", "boolean", "false")])
    assert debconf.helper("apply", "--root", str(dpkg_root)).returncode == 0
    agent = AgentDir(dpkg_root)
    assert agent.record("seal-pending") is not None
    from defender_setup.cli import main

    assert main(["unseal", "--no-restart", "--root", str(dpkg_root)]) == 0
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert "credentials unchanged" in result.stderr, result.stderr
    assert agent.record("seal-pending") is None


@pytest.mark.allow_subprocess(*DEBCONF)
def test_seal_credentials_refused_below_systemd_250_names_the_question(debconf, dpkg_root):
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", CS),
                     _seed("seal-credentials", "boolean", "true"),
                     _seed("probe-hub", "boolean", "false")])
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 78
    lines = [x for x in result.stderr.splitlines() if x.startswith("defender-setup")]
    assert len(lines) == 1
    assert lines[0].startswith("defender-setup: invalid credential sealing: needs systemd 250")
    assert "(debconf question defender-setup/seal-credentials)" in lines[0]
    assert not (dpkg_root / "var").exists() and KEY.encode() not in debconf.database()


# -- a ModuleId other than the expected one is a warning, never an error ----------------------
WARNED = ("ModuleId 'DefenderIoTMicroAgent' differs from the expected DefenderIotMicroAgent "
          "only in letter case")


@pytest.mark.allow_subprocess(*DEBCONF)
def test_apply_warns_of_a_mis_cased_module_id_in_a_connection_string_and_writes_it(
        debconf, dpkg_root):
    answer = CS.replace("ModuleId=DefenderIotMicroAgent", "ModuleId=DefenderIoTMicroAgent")
    debconf.preseed([_seed("auth-method", "select", "connection-string"),
                     _seed("connection-string", "password", answer),
                     _seed("probe-hub", "boolean", "false")])
    assert debconf.helper("check", "--root", str(dpkg_root)).returncode == 0  # not an error
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert f"defender-setup: warning: {WARNED}" in result.stderr  # what dpkg shows
    assert b"ModuleId=DefenderIoTMicroAgent;" in \
        AgentDir(dpkg_root).current()[CONNECTION_STRING_FILE]


@pytest.mark.allow_subprocess(*DEBCONF)
def test_apply_warns_of_a_mis_cased_module_id_question(debconf, dpkg_root, tmp_path):
    from tests import certfactory

    ident = certfactory.make_identity(cn="dev1", key="p256")
    (tmp_path / "dev1.pem").write_bytes(ident.cert_pem)
    (tmp_path / "dev1.key").write_bytes(ident.key_pem)
    debconf.preseed([_seed("auth-method", "select", "certificate"),
                     _seed("hub-hostname", "string", "hub.azure-devices.net"),
                     _seed("device-id", "string", "dev1"),
                     _seed("module-id", "string", "DefenderIoTMicroAgent"),
                     _seed("certificate-file", "string", str(tmp_path / "dev1.pem")),
                     _seed("private-key-file", "string", str(tmp_path / "dev1.key")),
                     _seed("probe-hub", "boolean", "false")])
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert f"defender-setup: warning: {WARNED}" in result.stderr  # what dpkg shows
    assert b"ModuleId=DefenderIoTMicroAgent;x509=true" in \
        AgentDir(dpkg_root).current()[CONNECTION_STRING_FILE]


# -- the dps method (zero-touch) through the real debconf protocol -------------------------------
# Here DPKG_ROOT is set: an image build, where the device is not the one that will run the image.
DPS_KEY = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="


def _dps_answers(scope="0ne0000ABCD", key=DPS_KEY, group="true"):
    return [_seed("auth-method", "select", "dps"), _seed("dps-id-scope", "string", scope),
            _seed("dps-symmetric-key", "password", key),
            _seed("dps-key-is-group-key", "boolean", group)]


@pytest.mark.allow_subprocess(*DEBCONF)
def test_dps_in_an_image_build_is_checked_not_registered_and_the_key_cleared(debconf,
                                                                             dpkg_root):
    debconf.preseed(_dps_answers())
    assert DPS_KEY.encode() in debconf.database()
    result = debconf.helper("apply", "--root", str(dpkg_root))
    assert result.returncode == 0, result.stderr
    assert "first boot" in result.stderr and DPS_KEY not in result.stderr + result.stdout
    assert not (dpkg_root / "var").exists()  # nothing stored: not a module key, not the key
    assert DPS_KEY.encode() not in debconf.database()
    assert debconf.get("dps-id-scope") == "0ne0000ABCD"  # not secret: kept for reconfigure
    assert debconf.get("auth-method") == "dps"


@pytest.mark.allow_subprocess(*DEBCONF)
def test_dps_bad_id_scope_goes_back_to_its_question_without_the_key(debconf, dpkg_root):
    debconf.preseed(_dps_answers(scope="one0000ABCD"))
    result = debconf.helper("check", "--root", str(dpkg_root))
    assert result.returncode == 65
    question, field, reason = result.stdout.rstrip("\n").split("\t")
    assert (question, field) == ("dps-id-scope", "DPS ID scope")
    assert "0ne" in reason and DPS_KEY not in result.stdout + result.stderr
    failed = debconf.helper("apply", "--root", str(dpkg_root))
    assert failed.returncode == 65
    assert "defender-setup/dps-id-scope" in failed.stderr
    assert DPS_KEY.encode() not in debconf.database()
    assert not (dpkg_root / "var").exists()


@pytest.mark.allow_subprocess(*DEBCONF)
def test_dps_config_teletype_asks_the_dps_questions_and_reasks_a_bad_key(debconf):
    """The real config script, the helper installed: dps, ID scope, attestation, a key that
    is not base64 (re-asked with the error), then a good one; nothing secret stays."""
    result = debconf.config("configure", "", unpacked=True,
                            input=f"3\n0ne0000ABCD\n1\nnot base64!\nyes\n{DPS_KEY}\n",
                            extra_env={"DEBIAN_FRONTEND": "teletype"})
    assert result.returncode == 0, result.stderr
    for prompt in ("DPS ID scope", "How the device proves its identity to DPS",
                   "DPS symmetric key", "Is this the key of an enrollment group"):
        assert prompt in result.stdout, (prompt, result.stdout)
    assert result.stdout.count("Invalid DPS enrollment group key") == 1, result.stdout
    assert debconf.get("dps-key-is-group-key") == "true"
    assert "DPS registration ID" not in result.stdout  # medium: the machine id by default
    assert set(debconf.variables("defender-setup/invalid").values()) <= {""}
    dump = (debconf.dir / "config.dat").read_bytes() + \
        (debconf.dir / "templates.dat").read_bytes()
    assert DPS_KEY.encode() not in dump


@pytest.mark.allow_subprocess(*DEBCONF)
def test_config_shows_dps_for_a_module_the_device_made_itself(debconf, dpkg_root):
    agent = dpkg_root / "var" / "defender_iot_micro_agent"
    (agent / ".defender-setup").mkdir(parents=True, mode=0o700)
    (agent / CONNECTION_STRING_FILE).write_text(CS + "\n")
    (agent / ".defender-setup" / "origin.json").write_text(
        '{"source": "dps", "time": "2026-12-04T14:00:00Z"}')
    # an upgrade: the installed helper says what is configured
    result = debconf.config("configure", "0.1.0", unpacked=True)
    assert result.returncode == 0, result.stderr
    assert debconf.get("auth-method") == "dps"


@pytest.mark.allow_subprocess(*DEBCONF)
@pytest.mark.parametrize("files, method", [
    ({"certificate_private.pem": "-----BEGIN PRIVATE KEY-----\n"}, "later"),
    ({CONNECTION_STRING_FILE: CS.split(";SharedAccessKey")[0] + ";x509=true\n"}, "certificate"),
    ({CONNECTION_STRING_FILE: CS + "\n", "certificate_private.pem": "x\n"}, "connection-string"),
], ids=["a-lone-key-file-is-unconfigured", "x509-decides", "the-connection-string-decides"])
def test_config_starts_from_the_method_the_core_decides(debconf, dpkg_root, files, method):
    """What the config script offers as the current method is the core's one rule (the
    connection string decides), not a guess from which files exist."""
    agent = dpkg_root / "var" / "defender_iot_micro_agent"
    agent.mkdir(parents=True, mode=0o700)
    for name, text in files.items():
        (agent / name).write_text(text)
    result = debconf.config("configure", "0.1.0", unpacked=True)
    assert result.returncode == 0, result.stderr
    assert debconf.get("auth-method") == method
