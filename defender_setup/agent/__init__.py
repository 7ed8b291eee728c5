"""The agent runtime run by ``defender-iot-micro-agent.service``.

``python3 -m defender_setup.agent [--root DIR]``; the logic and the connector seam (where the
IoT Hub connection plugs in) are documented in :mod:`defender_setup.agent.runtime`. Nothing is
imported here so that the process stays small.
"""
