"""defender-setup: provision the Microsoft Defender for IoT micro agent's authentication.

The package is split by responsibility (see README.md, "Layout"): pure validators
(:mod:`connection_string`, :mod:`certificates`), the only writer of the agent directory
(:mod:`agentdir`), the only systemctl/journal caller (:mod:`service`), the debconf bridge
and the command line (:mod:`cli`).
"""

__version__ = "0.2.0"

AGENT_DIR = "var/defender_iot_micro_agent"  # relative to a root; see agentdir.AgentDir
UNIT = "defender-iot-micro-agent.service"
DEFAULT_MODULE_ID = "DefenderIotMicroAgent"
