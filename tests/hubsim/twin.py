"""Module twins as IoT Hub keeps them: reported properties merged from MQTT PATCHes.

Interface::

    twins = Twins()
    status, version = twins.patch((device, module), payload_bytes)   # 204 and the new
                                                                      # $version, or 400, None
    twins.reported[(device, module)]     # {"$version": n, ...}: the merged properties
    answer_topic(topic, status, version) -> str   # $iothub/twin/res/{status}/?$rid=...

Written from IoT Hub's documented rules, independent of the agent's code: a PATCH is merged
(a JSON merge: objects key by key, ``null`` removes a key, anything else replaces), a body that
is not a JSON object, or a key holding ``.``, ``$``, a space or a control character, is
refused with 400.
"""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qs

PATCH_PREFIX = "$iothub/twin/PATCH/properties/reported/"
RESPONSES = "$iothub/twin/res/#"


def answer_topic(patch_topic: str, status: int, version: int | None) -> str:
    rid = parse_qs(patch_topic.partition("?")[2]).get("$rid", [""])[0]
    return f"$iothub/twin/res/{status}/?$rid={rid}" + (
        f"&$version={version}" if version is not None else "")


class Twins:
    def __init__(self):
        self.reported: dict = {}
        self.lock = threading.Lock()

    def patch(self, identity: tuple, payload: bytes):
        try:
            body = json.loads(payload)
        except ValueError:
            return 400, None
        if not isinstance(body, dict) or not _valid_keys(body):
            return 400, None
        with self.lock:
            current = self.reported.setdefault(identity, {"$version": 1})
            _merge_into(current, body)
            current["$version"] += 1
            return 204, current["$version"]


def _valid_keys(obj) -> bool:
    if not isinstance(obj, dict):
        return True
    for key, value in obj.items():
        if not key or any(c in ".$ " or ord(c) < 32 or 127 <= ord(c) < 160 for c in key):
            return False
        if not _valid_keys(value):
            return False
    return True


def _merge_into(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge_into(target[key], value)
        else:
            target[key] = value
