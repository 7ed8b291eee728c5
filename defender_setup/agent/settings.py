"""Agent settings from ``/etc/defender_iot_micro_agent/conf.json`` (optional).

Interface::

    load(root=Path("/")) -> Settings           # raises SettingsError (one line, exit 78)
    parse(text: bytes | str, source="conf.json") -> Settings
    socks_for(proxy) -> module                 # python3-socks; SettingsError when missing

The file is a JSON object; every key is optional and none is needed for the default case
(MQTT over TLS on 8883, the system CA store)::

    {
      "transport": "mqtt" | "websocket",      # websocket: MQTT over WebSocket on 443
      "proxy": "http://host:3128",            # also socks5://, socks4://; needs python3-socks
      "ca_file": "/etc/ssl/private/hub-ca.pem",   # trust only this CA file (gateways, private hubs)
      "heartbeat_interval": 300,              # seconds between heartbeat messages; 0 = off
      "sas_lifetime": 3600,                   # seconds a SAS token is valid (renewed at 80 %)
      "twin_interval": 60,                    # at least this many seconds between two updates
                                              # of the module twin's reported properties; 0 = off
      "port": 8883,                           # only for test hubs and unusual gateways
      "https_port": 443                       # the hub's HTTPS API (zero-touch provisioning
                                              # creates the module there); test hubs only
    }

Microsoft's micro agent reads the same file with its own two keys, and so does this one, so one
file serves both agents::

    "IothubModule_ProxyConfig": "<proxy_ipv4>,<port>[,<username>,<password>]"   # an HTTP proxy
    "IothubModule_TransportProtocol": "MQTT_Protocol" | "MQTT_WebSocket_Protocol"

The AMQP values Microsoft's agent knows are refused naming their MQTT equivalent (this agent
speaks MQTT only). A file that sets the same thing both ways (``proxy`` and
``IothubModule_ProxyConfig``, ``transport`` and ``IothubModule_TransportProtocol``) is refused:
which one wins would be a guess. An empty or null value counts as not set.

Unknown keys are errors (a typo such as ``"transprot"`` would otherwise be ignored silently),
and so are keys given twice. Errors name the file, the key and what is accepted, never more than
one line. A proxy user and password are accepted in the URL but never repeated in messages or
``repr``.

Hostile or broken files end in such a line too, never in an exception: conf.json is read only if
it is a regular file of at most 64 KiB (a FIFO would block the agent, ``/dev/zero`` would fill
it), and ``ca_file`` likewise up to 1 MiB. The JSON object is decoded one value at a time:
every accepted value is a string or a number, so a list or an object is refused by its key
without being decoded (Python's decoder recurses, and 5,000 nested brackets exhaust its
stack), and a number of more than 18 digits is refused as text (Python refuses to convert one
of over 4,300 digits). Control characters in ``ca_file`` and a proxy host that is neither a
DNS name nor an IP address (an unclosed ``[`` included) are refused naming the key.
"""

from __future__ import annotations

import json
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from defender_setup.agent.credsdir import ABSENT
from defender_setup.errors import EX_CONFIG, SetupError

CONF_PATH = "etc/defender_iot_micro_agent/conf.json"  # relative to a root

TRANSPORTS = ("mqtt", "websocket")
DEFAULT_PORTS = {"mqtt": 8883, "websocket": 443}
PROXY_SCHEMES = ("http", "socks5", "socks4")
# Bounds keep a typo (ms instead of s) from flooding the hub or making tokens live for years:
# (lowest, highest, whether 0 turns it off), checked in this order; defaults are Settings'.
NUMBERS = {"heartbeat_interval": (5, 86400, True), "sas_lifetime": (5, 7 * 86400, False),
           "port": (1, 65535, False), "https_port": (1, 65535, False),
           "twin_interval": (1, 86400, True)}
MAX_CONF_BYTES = 64 * 1024  # the largest sensible file is under 1 KiB
MAX_CA_BYTES = 1024 * 1024  # a bundle of all of Debian's ~140 roots is about 220 KiB
MAX_DIGITS = 18  # every accepted number has at most 6 digits
# Microsoft's keys for the same settings (its agent 4.1.2 and later reads this file too).
MS_PROXY = "IothubModule_ProxyConfig"
MS_TRANSPORT = "IothubModule_TransportProtocol"
MS_TRANSPORTS = {"MQTT_Protocol": "mqtt", "MQTT_WebSocket_Protocol": "websocket"}
MS_AMQP = {"AMQP_Protocol": "MQTT_Protocol", "AMQP_WebSocket_Protocol": "MQTT_WebSocket_Protocol"}
SAME_SETTING = {"proxy": MS_PROXY, "transport": MS_TRANSPORT}  # ours -> Microsoft's
MS_PROXY_SHAPE = '"<proxy_ipv4>,<port>" or "<proxy_ipv4>,<port>,<username>,<password>"'
KNOWN = ("transport", "proxy", "ca_file", "heartbeat_interval", "sas_lifetime", "port",
         "https_port", "twin_interval", MS_PROXY, MS_TRANSPORT)
# what a file is when it is not a regular file (a directory is an IsADirectoryError)
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_SPACE = re.compile(r"[ \t\n\r]*")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")


class SettingsError(SetupError):
    """conf.json is unreadable or invalid: a configuration error (EX_CONFIG, not restarted)."""

    exit_code = EX_CONFIG


@dataclass(frozen=True)
class Proxy:
    """The proxy of conf.json; its user name and password stay out of ``repr``."""

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
    """What conf.json says, defaults filled in (see the module docstring)."""

    transport: str = "mqtt"
    proxy: Proxy | None = None
    ca_file: Path | None = None
    heartbeat_interval: int = 300
    sas_lifetime: int = 3600
    port: int | None = None
    https_port: int = 443
    twin_interval: int = 60
    # Which key the file used, ours or Microsoft's, so advice names the key to edit.
    transport_key: str = field(default="transport", repr=False, compare=False)
    proxy_key: str = field(default="proxy", repr=False, compare=False)

    @property
    def hub_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.transport]

    def websocket_setting(self) -> str:
        """The JSON member that turns WebSocket on, in the key this file uses."""
        if self.transport_key == MS_TRANSPORT:
            return f'"{MS_TRANSPORT}": "MQTT_WebSocket_Protocol"'
        return '"transport": "websocket"'


class _Refused(Exception):
    """A file that must not be read: a FIFO, a device, a directory, or too large."""


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``, without ever blocking.

    :raises _Refused: not a regular file, or larger than ``limit``.
    :raises OSError: missing or unreadable.
    """
    # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory")
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise _Refused(f"is {kind}, not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        shown = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"
        raise _Refused(f"is larger than {shown} ({limit} bytes)")
    return data


def socks_for(proxy: Proxy):
    """python3-socks, which every proxy needs (the agent's connection, ``check``'s and
    DPS's): the one place that decides it, with the one message.

    :raises SettingsError: it is not installed.
    """
    try:
        import socks
    except ImportError:
        raise SettingsError(f"/{CONF_PATH}: proxy {proxy.describe()} needs python3-socks "
                            "(apt install python3-socks)") from None
    return socks


def load(root: Path = Path("/"), credentials_dir: Path | None = None) -> Settings:
    """Read ``conf.json`` under ``root``; a missing file means the defaults.

    :param credentials_dir: the service's ``$CREDENTIALS_DIRECTORY``. The unit hands the file
        over as the credential ``conf.json`` (it may hold a proxy password and be root-only,
        and the agent runs unprivileged); messages still name the real file.
    """
    path = source = Path(root) / CONF_PATH
    copy = Path(credentials_dir) / "conf.json" if credentials_dir is not None else None
    if copy is not None and copy.exists():
        path = copy
    try:
        data = _read_regular(path, MAX_CONF_BYTES)
    except FileNotFoundError:
        return Settings()
    except _Refused as err:
        raise SettingsError(f"{source}: {err}, not a settings file") from None
    except OSError as err:
        raise SettingsError(f"{source}: cannot read: {err.strerror}") from None
    if path == copy and data == ABSENT:  # the unit's stand-in: there is no conf.json
        return Settings()
    return parse(data, source=str(source), root=Path(root))


def parse(text, source: str = "conf.json", root: Path = Path("/")) -> Settings:
    """Validate the JSON text; ``root`` is where ``ca_file`` paths are looked up (tests)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")  # a BOM, as Windows editors write it, is fine
        except UnicodeDecodeError:
            raise SettingsError(f"{source}: not UTF-8 text") from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        return Settings()  # an empty file is as good as none

    def err(key: str, message: str) -> SettingsError:
        return SettingsError(f"{source}: {key}: {message}")

    try:
        obj = _members(text, source, err)
    except json.JSONDecodeError as error:
        raise SettingsError(
            f"{source}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None

    unknown = sorted(set(obj) - set(KNOWN))
    if unknown:
        raise SettingsError(f"{source}: unknown setting {_short(unknown[0])} "
                            f"(known: {', '.join(sorted(KNOWN))})")

    for ours, theirs in SAME_SETTING.items():
        if _given(obj, ours) and _given(obj, theirs):
            raise SettingsError(f"{source}: {ours} and {theirs} both set the {ours}: keep one "
                                f"of them ({theirs} is read by Microsoft's agent too)")

    if _given(obj, MS_TRANSPORT):
        transport = _ms_transport(obj[MS_TRANSPORT], err)
    else:
        transport = obj.get("transport", "mqtt")
        if transport not in TRANSPORTS:
            raise err("transport", f'must be "mqtt" or "websocket", got {_show(transport)}')

    proxy = _ms_proxy(obj[MS_PROXY], err) if _given(obj, MS_PROXY) else \
        _proxy(obj["proxy"], err) if _given(obj, "proxy") else None
    ca_file = _ca_file(obj["ca_file"], root, err) if _given(obj, "ca_file") else None

    numbers = {key: _int(obj[key], key, bounds, err) for key, bounds in NUMBERS.items()
               if obj.get(key) is not None}
    return Settings(transport, proxy, ca_file, **numbers,
                    transport_key=MS_TRANSPORT if _given(obj, MS_TRANSPORT) else "transport",
                    proxy_key=MS_PROXY if _given(obj, MS_PROXY) else "proxy")


class _Opaque:
    """A value refused unseen: a list or object (never decoded), or a number too long."""

    def __init__(self, kind: str, number: bool = False):
        self.kind, self.number = kind, number


def _number(digits: str):
    if len(digits.lstrip("-")) > MAX_DIGITS:
        return _Opaque(f"a number of {len(digits.lstrip('-'))} digits", number=True)
    return int(digits)


_SCALARS = json.JSONDecoder(parse_int=_number)


def _members(text: str, source: str, err) -> dict:
    """The top-level object's members, decoded one value at a time (see the module docstring).

    Raises json.JSONDecodeError (with its position) for invalid JSON, SettingsError for a key
    given twice. Decoding stops at the first list or object: its key's check refuses it.
    """
    pos = _SPACE.match(text).end()
    if text[pos:pos + 1] != "{":  # a list is named unseen, like a member's
        kind = {"[": "a list", "": "nothing"}.get(text[pos:pos + 1]) or \
            _kind(_SCALARS.raw_decode(text, pos)[0])
        raise SettingsError(f"{source}: expected a JSON object {{...}}, got {kind}")
    members: dict = {}
    pos = _SPACE.match(text, pos + 1).end()
    if text[pos:pos + 1] == "}":
        return _end(text, pos + 1, members)
    while True:
        if text[pos:pos + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                       text, pos)
        key, pos = json.decoder.scanstring(text, pos + 1)
        pos = _SPACE.match(text, pos).end()
        if text[pos:pos + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _SPACE.match(text, pos + 1).end()
        if key in members:
            raise err(_short(key, quote=False), "given twice")
        if text[pos:pos + 1] in ("[", "{"):
            members[key] = _Opaque("a list" if text[pos] == "[" else "an object")
            return members
        members[key], pos = _SCALARS.raw_decode(text, pos)
        pos = _SPACE.match(text, pos).end()
        if text[pos:pos + 1] == "}":
            return _end(text, pos + 1, members)
        if text[pos:pos + 1] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _SPACE.match(text, pos + 1).end()


def _end(text: str, pos: int, members: dict) -> dict:
    pos = _SPACE.match(text, pos).end()
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    return members


def _proxy(value, err) -> Proxy:
    if not isinstance(value, str):
        raise err("proxy", f'must be a URL such as "http://proxy:3128", got {_kind(value)}')
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
        host = url.hostname
    except ValueError:  # an unclosed "[", a port out of range or not a number
        url, port, host = None, -1, None
    if url is None or url.scheme not in PROXY_SCHEMES or not host or port == -1:
        # The URL may hold a password: describe its shape, not its text.
        raise err("proxy", "must look like http://host:port (or socks5://, socks4://)")
    if url.path not in ("", "/") or url.query:
        raise err("proxy", "must be scheme://[user:password@]host:port without a path")
    if not _HOST.fullmatch(host):
        raise err("proxy", "the host must be a DNS name or an IP address")
    default = 1080 if url.scheme.startswith("socks") else 3128
    user, password = (urllib.parse.unquote(v) if v else None for v in (url.username, url.password))
    return Proxy(url.scheme, host, port or default, user, password)


def _given(obj: dict, key: str) -> bool:
    """Whether the file sets ``key``: an empty string or null means "not set"."""
    return obj.get(key) not in (None, "")


def _ms_transport(value, err) -> str:
    if value in MS_AMQP:  # Microsoft's agent speaks AMQP too; this one MQTT only
        raise err(MS_TRANSPORT, f"this agent speaks MQTT only: use {MS_AMQP[value]} instead "
                                f"of {value}")
    if value not in MS_TRANSPORTS:
        raise err(MS_TRANSPORT, 'must be "MQTT_Protocol" or "MQTT_WebSocket_Protocol", got '
                                f"{_show(value)}")
    return MS_TRANSPORTS[value]


def _ms_proxy(value, err) -> Proxy:
    """Microsoft's ``"<proxy_ipv4>,<port>[,<username>,<password>]"``: an HTTP proxy. The
    password is the rest of the text (it may hold commas) and is never repeated: messages
    describe the shape and name the part, not its text."""
    if not isinstance(value, str):
        raise err(MS_PROXY, f"must be {MS_PROXY_SHAPE}, got {_kind(value)}")
    parts = value.split(",", 3)
    if len(parts) not in (2, 4):
        raise err(MS_PROXY, f"must be {MS_PROXY_SHAPE} ({len(parts)} comma-separated "
                            f"part{'s' * (len(parts) != 1)} given)")
    host, port = parts[0].strip(), parts[1].strip()
    if not _HOST.fullmatch(host):
        raise err(MS_PROXY, f"the first part must be the proxy's IP address: {MS_PROXY_SHAPE}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise err(MS_PROXY, "the second part must be the proxy's port, 1 to 65535")
    username = password = None
    if len(parts) == 4:
        username, password = parts[2].strip(), parts[3]
        if not username or not password:
            raise err(MS_PROXY, "the user name and the password must both be given, or neither")
    return Proxy("http", host, int(port), username, password)


def _ca_file(value, root: Path, err) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise err("ca_file", f"must be an absolute path, got {_show(value)}")
    bad = next((i for i, c in enumerate(value) if ord(c) < 32 or c == "\x7f"), None)
    if bad is not None:
        raise err("ca_file", f"must not contain control characters (U+{ord(value[bad]):04X} "
                             f"at position {bad + 1})")
    path = Path(root) / value.lstrip("/")
    try:
        head = _read_regular(path, MAX_CA_BYTES)
    except _Refused as error:
        raise err("ca_file", f"{_short(value, quote=False)} {error}") from None
    except PermissionError:
        # The agent runs as an unprivileged user; a CA certificate is public.
        raise err("ca_file", f"cannot read {value}: permission denied; the agent runs "
                  "unprivileged: make the CA file (and its directory) readable by all, "
                  "e.g. chmod 0644") from None
    except OSError as error:
        raise err("ca_file", f"cannot read {value}: {error.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise err("ca_file", f"{value} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return path


def _int(value, key, bounds, err):
    low, high, zero_ok = bounds
    extra = " (or 0 to turn it off)" if zero_ok else ""
    if isinstance(value, _Opaque) and value.number:
        raise err(key, f"must be between {low} and {high}{extra}, got {value.kind}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(key, f"must be a whole number of seconds, got {_show(value)}")
    if zero_ok and value == 0:
        return 0
    if not low <= value <= high:
        raise err(key, f"must be between {low} and {high}{extra}, got {value}")
    return value


def _kind(value) -> str:
    if isinstance(value, _Opaque):
        return value.kind
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _show(value) -> str:
    if isinstance(value, str):
        return json.dumps(value[:40])
    return _kind(value)


def _short(text: str, quote: bool = True) -> str:
    """A key or path for a message: at most 40 characters, control characters escaped."""
    shown = text[:40] + ("…" if len(text) > 40 else "")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return f"'{shown}'" if quote else shown
