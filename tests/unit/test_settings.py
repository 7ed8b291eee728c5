"""defender_setup.agent.settings: conf.json defaults, validation, one-line errors."""

import json
import os

import pytest

from defender_setup.agent import settings
from defender_setup.agent.settings import SettingsError, load, parse
from defender_setup.errors import EX_CONFIG

pytestmark = pytest.mark.hub  # the agent's own: also run on Debian 11 and 13

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def write_conf(root, obj):
    path = root / settings.CONF_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_no_file_means_defaults(tmp_path):
    s = load(tmp_path)
    assert s == settings.Settings()
    assert (s.transport, s.hub_port, s.proxy, s.ca_file) == ("mqtt", 8883, None, None)
    assert (s.heartbeat_interval, s.sas_lifetime) == (300, 3600)


def test_empty_file_means_defaults(tmp_path):
    write_conf(tmp_path, "  \n")
    assert load(tmp_path) == settings.Settings()


def test_full_file(tmp_path):
    ca = tmp_path / "etc/ssl/hub-ca.pem"
    ca.parent.mkdir(parents=True)
    ca.write_bytes(PEM)
    write_conf(tmp_path, {"transport": "websocket", "proxy": "http://user:p%40ss@proxy:8080",
                          "ca_file": "/etc/ssl/hub-ca.pem", "heartbeat_interval": 0,
                          "sas_lifetime": 600})
    s = load(tmp_path)
    assert s.transport == "websocket" and s.hub_port == 443
    assert s.proxy.describe() == "http://proxy:8080"
    assert (s.proxy.username, s.proxy.password) == ("user", "p@ss")
    assert "p@ss" not in repr(s) and "user" not in repr(s.proxy)
    assert s.ca_file == ca
    assert (s.heartbeat_interval, s.sas_lifetime) == (0, 600)


@pytest.mark.parametrize("text,expected", [
    ("{", "invalid JSON at line 1 column 2"),
    ("[]", "expected a JSON object {...}, got a list"),
    ('{"transprot": "mqtt"}', "unknown setting 'transprot' (known: "),
    ('{"transport": "tcp"}', 'transport: must be "mqtt" or "websocket", got "tcp"'),
    ('{"transport": 1}', 'transport: must be "mqtt" or "websocket", got a number'),
    ('{"heartbeat_interval": "60"}', "heartbeat_interval: must be a whole number of seconds"),
    ('{"heartbeat_interval": 1}', "heartbeat_interval: must be between 5 and 86400 (or 0"),
    ('{"sas_lifetime": true}', "sas_lifetime: must be a whole number of seconds, got true/false"),
    ('{"sas_lifetime": 0}', "sas_lifetime: must be between 5 and 604800, got 0"),
    ('{"port": 70000}', "port: must be between 1 and 65535"),
    ('{"proxy": 3128}', 'proxy: must be a URL such as "http://proxy:3128", got a number'),
    ('{"proxy": "ftp://u:secretpw@x:1"}', "proxy: must look like http://host:port"),
    ('{"proxy": "http://u:secretpw@x:99999"}', "proxy: must look like http://host:port"),
    ('{"ca_file": "relative.pem"}', 'ca_file: must be an absolute path, got "relative.pem"'),
    ('{"ca_file": "/nonexistent/ca.pem"}', "ca_file: cannot read /nonexistent/ca.pem: "
                                           "No such file or directory"),
])
def test_bad_input_one_clear_line(tmp_path, text, expected):
    path = write_conf(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        load(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message and "secretpw" not in message
    assert err.value.exit_code == EX_CONFIG


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("text,expected", [
    # each of these once ended the agent with an internal error (exit 70)
    ('{"proxy": ' + DEEP + '}', 'proxy: must be a URL such as "http://proxy:3128", got a list'),
    ('{"port": {"a": ' + DEEP + '}}', "port: must be a whole number of seconds, got an object"),
    ('{"heartbeat_interval": ' + ("9" * 5000) + '}',
     "heartbeat_interval: must be between 5 and 86400 (or 0 to turn it off), got a number of "
     "5000 digits"),
    ('{"proxy": "http://[::1:8080"}', "proxy: must look like http://host:port"),
    ('{"ca_file": "/etc/hub\\u0000ca.pem"}', "ca_file: must not contain control characters "
                                               "(U+0000 at position 9)"),
    # and their neighbours
    (DEEP, "expected a JSON object {...}, got a list"),
    ('{"transprot": ' + DEEP + '}', "unknown setting 'transprot'"),
    ('{"port": 8883, "port": 443}', "port: given twice"),
    ('{"proxy": "http://pro\\u0000xy:3128"}', "proxy: the host must be a DNS name or an IP "
                                                "address"),
    ('{"port": 1} x', "invalid JSON at line 1 column 13: Extra data"),
    ('{"port" 1}', "invalid JSON at line 1 column 9: Expecting ':' delimiter"),
    ('{"' + ("k" * 1000) + '": 1}', "unknown setting 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…'"),
], ids=["deep-list", "deep-object", "5000-digits", "unclosed-ipv6-proxy", "nul-in-ca-file",
        "deep-top-level", "deep-unknown-key", "duplicate-key", "nul-in-proxy", "extra-data",
        "no-colon", "long-key"])
def test_hostile_conf_json_is_one_line_naming_the_key(tmp_path, text, expected):
    path = write_conf(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        load(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message and len(message) < 400


def test_conf_json_over_64_kib_is_refused_naming_the_limit(tmp_path):
    write_conf(tmp_path, json.dumps({"proxy": "x" * (64 * 1024)}))
    with pytest.raises(SettingsError, match=r"larger than 64 KiB \(65536 bytes\)"):
        load(tmp_path)


def test_conf_json_or_ca_file_as_a_fifo_never_blocks(tmp_path):
    path = tmp_path / settings.CONF_PATH
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.raises(SettingsError, match="conf.json: is a FIFO"):
        load(tmp_path)
    os.mkfifo(tmp_path / "ca.pem")
    with pytest.raises(SettingsError, match="ca_file: /ca.pem is a FIFO"):
        parse('{"ca_file": "/ca.pem"}', root=tmp_path)


def test_ca_file_device_or_too_large(tmp_path):
    with pytest.raises(SettingsError, match="ca_file: /dev/zero is a character device"):
        parse('{"ca_file": "/dev/zero"}')
    (tmp_path / "ca.pem").write_bytes(PEM * (1024 * 1024 // len(PEM) + 1))
    with pytest.raises(SettingsError, match=r"ca_file: /ca.pem is larger than 1 MiB"):
        parse('{"ca_file": "/ca.pem"}', root=tmp_path)


def test_bom_is_accepted():
    assert parse("\ufeff{\"port\": 8884}".encode()).port == 8884


def test_ca_file_without_certificate(tmp_path):
    (tmp_path / "ca.pem").write_text("hello")
    with pytest.raises(SettingsError, match="holds no PEM certificate"):
        parse('{"ca_file": "/ca.pem"}', root=tmp_path)


def test_ca_file_that_is_a_directory(tmp_path):
    (tmp_path / "ca.pem").mkdir()
    with pytest.raises(SettingsError, match="ca_file: cannot read /ca.pem: Is a directory"):
        parse('{"ca_file": "/ca.pem"}', root=tmp_path)


def test_unreadable_conf_is_a_settings_error(tmp_path):
    path = tmp_path / settings.CONF_PATH
    path.mkdir(parents=True)
    with pytest.raises(SettingsError, match="cannot read: Is a directory"):
        load(tmp_path)


def test_not_utf8(tmp_path):
    with pytest.raises(SettingsError, match="not UTF-8"):
        parse(b"\xff\xfe{}")


def test_socks_default_port():
    s = parse('{"proxy": "socks5://proxy"}')
    assert s.proxy.describe() == "socks5://proxy:1080"


# Microsoft's keys: one conf.json serves its agent and this one.
MS_PROXY, MS_TRANSPORT = settings.MS_PROXY, settings.MS_TRANSPORT


@pytest.mark.parametrize("value,expected", [
    ("MQTT_Protocol", ("mqtt", 8883)),
    ("MQTT_WebSocket_Protocol", ("websocket", 443)),
])
def test_microsofts_transport_protocol(value, expected):
    s = parse(json.dumps({MS_TRANSPORT: value}))
    assert (s.transport, s.hub_port) == expected
    assert s == parse(json.dumps({"transport": expected[0]}))  # the same as our own key


@pytest.mark.parametrize("value,instead", [
    ("AMQP_Protocol", "MQTT_Protocol"),
    ("AMQP_WebSocket_Protocol", "MQTT_WebSocket_Protocol"),
])
def test_microsofts_amqp_is_refused_naming_the_mqtt_equivalent(tmp_path, value, instead):
    path = write_conf(tmp_path, {MS_TRANSPORT: value})
    with pytest.raises(SettingsError) as err:
        load(tmp_path)
    assert str(err.value) == (f"{path}: {MS_TRANSPORT}: this agent speaks MQTT only: use "
                              f"{instead} instead of {value}")
    assert err.value.exit_code == EX_CONFIG


def test_microsofts_transport_other_values_are_refused():
    with pytest.raises(SettingsError) as err:
        parse(json.dumps({MS_TRANSPORT: "mqtt"}))
    assert str(err.value) == (f'conf.json: {MS_TRANSPORT}: must be "MQTT_Protocol" or '
                              '"MQTT_WebSocket_Protocol", got "mqtt"')


def test_microsofts_proxy_without_credentials():
    s = parse(json.dumps({MS_PROXY: "192.0.2.7,3128"}))
    assert s.proxy == settings.Proxy("http", "192.0.2.7", 3128)
    assert (s.proxy.username, s.proxy.password) == (None, None)
    assert s == parse('{"proxy": "http://192.0.2.7:3128"}')


def test_microsofts_proxy_with_credentials_keeps_the_password_out_of_sight():
    # the password is the rest of the text: a comma in it is the password's
    s = parse(json.dumps({MS_PROXY: "192.0.2.7,8080,agent,s3cr,et"}))
    assert s.proxy.describe() == "http://192.0.2.7:8080"
    assert (s.proxy.username, s.proxy.password) == ("agent", "s3cr,et")
    assert "s3cr" not in repr(s)


@pytest.mark.parametrize("value,expected", [
    ("192.0.2.7", "must be \"<proxy_ipv4>,<port>\" or \"<proxy_ipv4>,<port>,<username>,"
                  "<password>\" (1 comma-separated part given)"),
    ("192.0.2.7,3128,agent", "(3 comma-separated parts given)"),
    ("192.0.2.7,secretpw", "the second part must be the proxy's port, 1 to 65535"),
    ("192.0.2.7,70000,agent,secretpw", "the second part must be the proxy's port, 1 to 65535"),
    ("192.0.2.7,٣١٢٨,agent,secretpw", "the second part must be the proxy's port"),
    ("http://192.0.2.7,3128,agent,secretpw", "the first part must be the proxy's IP address"),
    ("192.0.2.7,3128,,secretpw", "the user name and the password must both be given, or neither"),
    ("192.0.2.7,3128,secretpw,", "the user name and the password must both be given, or neither"),
    (3128, "must be \"<proxy_ipv4>,<port>\" or \"<proxy_ipv4>,<port>,<username>,<password>\", "
           "got a number"),
])
def test_microsofts_proxy_refused_in_one_line_without_the_password(value, expected):
    with pytest.raises(SettingsError) as err:
        parse(json.dumps({MS_PROXY: value}))
    message = str(err.value)
    assert message.startswith(f"conf.json: {MS_PROXY}: ") and expected in message, message
    assert "secretpw" not in message and "\n" not in message


@pytest.mark.parametrize("conf,ours,theirs", [
    ({"transport": "websocket", MS_TRANSPORT: "MQTT_WebSocket_Protocol"}, "transport",
     MS_TRANSPORT),
    ({"proxy": "http://192.0.2.7:3128", MS_PROXY: "192.0.2.7,3128,agent,secretpw"}, "proxy",
     MS_PROXY),
], ids=["transport", "proxy"])
def test_the_same_setting_both_ways_is_refused_in_one_line(tmp_path, conf, ours, theirs):
    # even when both agree: which one wins would be a guess the next edit breaks
    path = write_conf(tmp_path, conf)
    with pytest.raises(SettingsError) as err:
        load(tmp_path)
    assert str(err.value) == (f"{path}: {ours} and {theirs} both set the {ours}: keep one of "
                              f"them ({theirs} is read by Microsoft's agent too)")
    assert "secretpw" not in str(err.value)


def test_an_empty_microsoft_key_is_not_set():
    # a conf.json that leaves Microsoft's proxy empty and uses our own key is not a conflict
    s = parse(json.dumps({MS_PROXY: "", MS_TRANSPORT: None, "proxy": "http://p:3128",
                          "transport": "websocket"}))
    assert (s.proxy.describe(), s.transport) == ("http://p:3128", "websocket")
    assert parse(json.dumps({MS_PROXY: "", MS_TRANSPORT: ""})) == settings.Settings()


def test_microsofts_keys_next_to_our_others():
    s = parse(json.dumps({MS_PROXY: "192.0.2.7,3128", MS_TRANSPORT: "MQTT_WebSocket_Protocol",
                          "heartbeat_interval": 60, "port": 8443}))
    assert (s.transport, s.hub_port, s.proxy.describe(), s.heartbeat_interval) == (
        "websocket", 8443, "http://192.0.2.7:3128", 60)


def test_https_port_for_test_hubs():
    assert parse("{}").https_port == 443
    assert parse('{"https_port": 8443}').https_port == 8443
    with pytest.raises(SettingsError, match="https_port: must be between 1 and 65535"):
        parse('{"https_port": 0}')


def test_a_proxy_without_python3_socks_is_one_settings_error_everywhere(monkeypatch, tmp_path):
    """The agent's link, check's agent-settings and the path steps (DPS's too) say the same."""
    import sys
    from types import SimpleNamespace

    from defender_setup import hubpath, netcheck
    from defender_setup.agent.hubnet import Link

    proxy = parse('{"proxy": "http://proxy.example:3128"}').proxy
    expected = (f"/{settings.CONF_PATH}: proxy http://proxy.example:3128 needs python3-socks "
                "(apt install python3-socks)")
    monkeypatch.setitem(sys.modules, "socks", None)  # "import socks" raises ImportError
    with pytest.raises(SettingsError) as err:
        settings.socks_for(proxy)
    assert str(err.value) == expected and err.value.exit_code == EX_CONFIG
    with pytest.raises(hubpath.PathError) as path_err:
        hubpath.open_tcp("hub.example", 443, proxy, 1.0, [(2, ("127.0.0.1", 3128))])
    assert path_err.value.text == expected
    with pytest.raises(SettingsError, match="needs python3-socks"):
        Link(SimpleNamespace(connect_host="hub.example"), parse('{"proxy": "http://p:3128"}'))
    conf = tmp_path / settings.CONF_PATH
    conf.parent.mkdir(parents=True)
    conf.write_text('{"proxy": "http://proxy.example:3128"}')
    added = []
    assert netcheck._settings(tmp_path, lambda *a: added.append(a), False) is None
    assert added == [("agent-settings", "error", expected, EX_CONFIG)]
