"""Agent settings from ``/etc/defender_iot_micro_agent/conf.json`` (optional).

Interface::

    load(root=Path("/")) -> Settings           # raises SettingsError (one line, exit 78)
    parse(text: bytes | str, source="conf.json") -> Settings

The file is a JSON object; every key is optional and none is needed for the default case
(MQTT over TLS on 8883, the system CA store)::

    {
      "transport": "mqtt" | "websocket",      # websocket: MQTT over WebSocket on 443
      "proxy": "http://host:3128",            # also socks5://, socks4://; needs python3-socks
      "ca_file": "/etc/ssl/private/hub-ca.pem",   # trust only this CA file (gateways, private hubs)
      "heartbeat_interval": 300,              # seconds between heartbeat messages; 0 = off
      "sas_lifetime": 3600,                   # seconds a SAS token is valid (renewed at 80 %)
      "port": 8883                            # only for test hubs and unusual gateways
    }

Unknown keys are errors (a typo such as ``"transprot"`` would otherwise be ignored silently).
Errors name the file, the key and what is accepted, never more than one line. A proxy user and
password are accepted in the URL but never repeated in messages or ``repr``.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from defender_setup.errors import EX_CONFIG, SetupError

CONF_PATH = "etc/defender_iot_micro_agent/conf.json"  # relative to a root

TRANSPORTS = ("mqtt", "websocket")
DEFAULT_PORTS = {"mqtt": 8883, "websocket": 443}
PROXY_SCHEMES = ("http", "socks5", "socks4")
# Bounds keep a typo (ms instead of s) from flooding the hub or making tokens live for years.
HEARTBEAT_RANGE = (5, 86400)
SAS_LIFETIME_RANGE = (5, 7 * 86400)
MAX_CONF_BYTES = 64 * 1024


class SettingsError(SetupError):
    """conf.json is unreadable or invalid: a configuration error (EX_CONFIG, not restarted)."""

    exit_code = EX_CONFIG


@dataclass(frozen=True)
class Proxy:
    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """``scheme://host:port`` without credentials, for logs and status."""
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    transport: str = "mqtt"
    proxy: Proxy | None = None
    ca_file: Path | None = None
    heartbeat_interval: int = 300
    sas_lifetime: int = 3600
    port: int | None = None

    @property
    def hub_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.transport]


def load(root: Path = Path("/")) -> Settings:
    """Read ``conf.json`` under ``root``; a missing file means the defaults."""
    path = Path(root) / CONF_PATH
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONF_BYTES + 1)
    except FileNotFoundError:
        return Settings()
    except OSError as err:
        raise SettingsError(f"{path}: cannot read: {err.strerror}") from None
    if len(data) > MAX_CONF_BYTES:
        raise SettingsError(f"{path}: larger than {MAX_CONF_BYTES} bytes, not a settings file")
    return parse(data, source=str(path), root=Path(root))


def parse(text, source: str = "conf.json", root: Path = Path("/")) -> Settings:
    """Validate the JSON text; ``root`` is where ``ca_file`` paths are looked up (tests)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SettingsError(f"{source}: not UTF-8 text") from None
    if not text.strip():
        return Settings()  # an empty file is as good as none
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise SettingsError(
            f"{source}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(obj, dict):
        raise SettingsError(f"{source}: expected a JSON object {{...}}, got {_kind(obj)}")

    known = {"transport", "proxy", "ca_file", "heartbeat_interval", "sas_lifetime", "port"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise SettingsError(
            f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )

    def err(key: str, message: str) -> SettingsError:
        return SettingsError(f"{source}: {key}: {message}")

    transport = obj.get("transport", "mqtt")
    if transport not in TRANSPORTS:
        raise err("transport", f'must be "mqtt" or "websocket", got {_show(transport)}')

    proxy = None
    if obj.get("proxy") not in (None, ""):
        proxy = _proxy(obj["proxy"], err)

    ca_file = None
    if obj.get("ca_file") not in (None, ""):
        ca_file = _ca_file(obj["ca_file"], root, err)

    heartbeat = _int(obj, "heartbeat_interval", 300, HEARTBEAT_RANGE, err, zero_ok=True)
    lifetime = _int(obj, "sas_lifetime", 3600, SAS_LIFETIME_RANGE, err)
    port = _int(obj, "port", None, (1, 65535), err)
    return Settings(transport, proxy, ca_file, heartbeat, lifetime, port)


def _proxy(value, err) -> Proxy:
    if not isinstance(value, str):
        raise err("proxy", f'must be a URL such as "http://proxy:3128", got {_kind(value)}')
    url = urllib.parse.urlsplit(value)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in PROXY_SCHEMES or not url.hostname or port == -1:
        # The URL may hold a password: describe its shape, not its text.
        raise err("proxy", "must look like http://host:port (or socks5://, socks4://)")
    if url.path not in ("", "/") or url.query:
        raise err("proxy", "must be scheme://[user:password@]host:port without a path")
    default = 1080 if url.scheme.startswith("socks") else 3128
    return Proxy(
        url.scheme,
        url.hostname,
        port or default,
        urllib.parse.unquote(url.username) if url.username else None,
        urllib.parse.unquote(url.password) if url.password else None,
    )


def _ca_file(value, root: Path, err) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise err("ca_file", f"must be an absolute path, got {_show(value)}")
    path = Path(root) / value.lstrip("/")
    try:
        with open(path, "rb") as handle:
            head = handle.read(MAX_CONF_BYTES * 16)
    except OSError as error:
        raise err("ca_file", f"cannot read {value}: {error.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise err("ca_file", f"{value} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return path


def _int(obj, key, default, bounds, err, zero_ok=False):
    if key not in obj or obj[key] is None:
        return default
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(key, f"must be a whole number of seconds, got {_show(value)}")
    low, high = bounds
    if zero_ok and value == 0:
        return 0
    if not low <= value <= high:
        extra = " (or 0 to turn it off)" if zero_ok else ""
        raise err(key, f"must be between {low} and {high}{extra}, got {value}")
    return value


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _show(value) -> str:
    if isinstance(value, str):
        return json.dumps(value[:40])
    return _kind(value)
