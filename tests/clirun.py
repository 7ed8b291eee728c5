"""Running the command line in-process on a throw-away root, for the unit and functional tiers.

Interface::

    Run(root, tmp_path, capsys, monkeypatch)   # run(*argv, stdin=b"") -> (code, out, err)
        .file(name, data) -> path; .inputs(inputs, via_stdin=False) -> argv
    assert_no_secret(inputs, *texts); agent_path(run); pending_update(run, sas, cert)
"""

import io
import json
import os
import sys

from defender_setup import cli
from tests import certfactory


class Run:
    def __init__(self, root, tmp_path, capsys, monkeypatch):
        self.root, self.tmp, self.capsys, self.monkeypatch = root, tmp_path, capsys, monkeypatch

    def file(self, name, data):
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    def __call__(self, *argv, stdin=b""):
        self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = cli.main([*argv, "--root", str(self.root)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def inputs(self, inputs, via_stdin=False):
        args = ["--method", inputs.method, "--connection-string-file",
                "-" if via_stdin else self.file("cs.txt", inputs.connection_string)]
        if inputs.certificate:
            args += ["--certificate", self.file("cert.pem", inputs.certificate),
                     "--private-key", self.file("key.pem", inputs.private_key)]
        return args


def secret_of(inputs) -> list[str]:
    text = inputs.connection_string.decode()
    secrets = [text.split("SharedAccessKey=")[1]] if "SharedAccessKey=" in text else []
    if inputs.private_key:
        secrets += certfactory.body(inputs.private_key)
    return secrets


def assert_no_secret(inputs, *texts):
    for secret in secret_of(inputs):
        for text in texts:
            assert secret not in text


def agent_path(run):
    return run.root / "var/defender_iot_micro_agent"


def pending_update(run, sas_inputs, cert_inputs):
    """A switch to the certificate set interrupted after its commit point: half switched."""
    from defender_setup.agentdir import AgentDir

    assert run("apply", "--no-restart", *run.inputs(sas_inputs))[0] == 0
    agent = AgentDir(run.root)
    staging = agent.state / "staging"
    staging.mkdir(mode=0o700)
    for name, (data, mode) in cert_inputs.validated().files.items():
        (staging / name).write_bytes(data)
        os.chmod(staging / name, mode)
    (agent.state / "txn").write_text(json.dumps({"files": sorted(cert_inputs.validated().files)}))
    os.replace(staging / "certificate_public.pem", agent.path / "certificate_public.pem")
    return agent
