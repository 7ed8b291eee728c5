"""Entry point: ``python3 -m defender_setup.agent [--root DIR]`` -> exit code.

Exit codes: 0 after SIGTERM; 78 (EX_CONFIG) for missing or invalid credentials, which the unit
does not restart (``RestartPreventExitStatus=78``); a connector's own code for a fatal,
credential-related failure (76: the hub rejected the identity, see
:mod:`defender_setup.agent.hub`); 70 (EX_SOFTWARE) for a bug, logged as one line with its location
(the message itself is left out: it could quote file content).
"""

from __future__ import annotations

import sys

from defender_setup.agent.deferred import AGENT, defer

defer(*AGENT)  # first: pathlib below imports urllib.parse, which imports ipaddress

from pathlib import Path  # noqa: E402

from defender_setup.errors import EX_SOFTWARE  # noqa: E402


def _root(argv: list[str]) -> Path:
    """The unit passes nothing and tests pass ``--root DIR``; anything else (``--help``, a
    typo) goes through argparse, which the agent does not load otherwise (0.4 MB resident
    with gettext and shutil)."""
    if not argv:
        return Path("/")
    if len(argv) == 2 and argv[0] == "--root" and not argv[1].startswith("-"):
        return Path(argv[1])
    import argparse

    parser = argparse.ArgumentParser(
        prog="python3 -m defender_setup.agent",
        description="Defender for IoT micro agent runtime (defender-iot-micro-agent.service)",
    )
    parser.add_argument("--root", type=Path, default=Path("/"), help="root directory (tests)")
    return parser.parse_args(argv).root


def main(argv=None) -> int:
    root = _root(sys.argv[1:] if argv is None else list(argv))

    from defender_setup.agent.runtime import ERR, Runtime, journal_log, load_credentials

    def load(root: Path):
        return load_credentials(root, isolate=True)  # no cryptography in this process

    try:
        from defender_setup.agent.hub import HubConnector  # the IoT Hub connection

        return Runtime(root, connector=HubConnector(root), loader=load).run()
    except Exception as err:  # one line, no traceback, no message (see the docstring)
        import traceback

        where = traceback.extract_tb(err.__traceback__)[-1]
        journal_log(
            f"internal error: {type(err).__name__} at {Path(where.filename).name}:{where.lineno}",
            ERR,
        )
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
