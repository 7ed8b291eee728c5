"""A test IoT Hub on loopback: real brokers, real TLS, no mock of the client or the network.

- :mod:`tests.hubsim.broker`: a small asyncio MQTT 3.1.1 broker (TLS, optional WebSocket
  transport) that authenticates CONNECTs with a pluggable function, records connections and
  messages, and can misbehave on purpose (fixed CONNACK code, never answer, drop the TLS
  handshake, disconnect when a token expires).
- :mod:`tests.hubsim.sasauth`: verifies an IoT Hub SAS token (signature, resource, expiry)
  against the device key, written from the protocol description, independent of the agent's
  own ``sas`` module.
- :mod:`tests.hubsim.pki`: a test CA, server certificates with subjectAltName, client certs.
- :mod:`tests.hubsim.mosquitto`: Debian's mosquitto with TLS requiring client certificates.

``python3 -m tests.hubsim --help`` runs the SAS hub standalone (bench, container tests).
"""
