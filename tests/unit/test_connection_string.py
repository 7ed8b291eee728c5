"""defender_setup.connection_string: every rule, every normalisation, and no secret in errors."""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defender_setup import connection_string as cs
from defender_setup.errors import ValidationError

KEY = base64.b64encode(bytes(range(100, 132))).decode()  # 32 bytes, 44 characters, padded
BASE = "HostName=hub1.azure-devices.net;DeviceId=dev1;ModuleId=DefenderIotMicroAgent"
GOOD = f"{BASE};SharedAccessKey={KEY}"


def error(text, **kwargs) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        cs.parse(text, **kwargs)
    assert KEY not in str(info.value)
    return info.value


def test_parses_a_module_connection_string():
    parsed = cs.parse(GOOD)
    assert (parsed.host_name, parsed.device_id, parsed.module_id) == \
        ("hub1.azure-devices.net", "dev1", "DefenderIotMicroAgent")
    assert parsed.shared_access_key == KEY
    assert parsed.method == "connection-string"
    assert parsed.warnings == ()
    assert parsed.canonical() == GOOD
    assert KEY not in repr(parsed) and KEY not in parsed.redacted()


def test_x509_connection_string_is_the_certificate_method():
    parsed = cs.parse(f"{BASE};x509=true", method="certificate")
    assert parsed.x509 and parsed.method == "certificate"
    assert parsed.canonical() == f"{BASE};x509=true"


def test_key_order_does_not_matter_and_canonical_form_is_fixed():
    shuffled = f"SharedAccessKey={KEY};ModuleId=DefenderIotMicroAgent;DeviceId=dev1;" \
        "HostName=hub1.azure-devices.net"
    assert cs.parse(shuffled).canonical() == GOOD


def test_padding_survives_the_split_at_the_first_equals_sign():
    assert cs.parse(GOOD).shared_access_key.endswith("=")


@pytest.mark.parametrize("pasted", [
    "\ufeff" + GOOD,
    b"\xef\xbb\xbf" + GOOD.encode(),
    GOOD + "\r\n",
    "  " + GOOD + "\n\n",
    f'"{GOOD}"',
    f"'{GOOD}'",
    f"\u201c{GOOD}\u201d",
    f"\u201d{GOOD}\u201d",
    f"\u2018{GOOD}\u2019",
    f" \u201c{GOOD}\u201d\r\n",
    GOOD + ";",
])
def test_normalises_what_people_paste(pasted):
    assert cs.parse(pasted).canonical() == GOOD


@pytest.mark.parametrize("text, field, words", [
    ("", "connection string", "is empty"),
    (GOOD.replace("dev1", "d\u00e9v1"), "connection string", "character 43 is not plain ASCII"),
    ("\u201c" + GOOD, "connection string", "typographic quote"),
    (GOOD.replace(";DeviceId", "\n;DeviceId"), "connection string", "single line"),
    (b"HostName=\xff", "connection string", "not valid UTF-8"),
    (GOOD.replace("DeviceId=dev1;", "DeviceId=dev1;;"), "connection string", "part 3 is empty"),
    (GOOD.replace("DeviceId=dev1;", "DeviceId=dev1;x;"), "connection string",
     "part 3 (1 character) has no '='"),
    (GOOD.replace("HostName", "hostname"), "connection string", "did you mean HostName?"),
    (GOOD.replace("ModuleId", "Moduleid"), "connection string", "did you mean ModuleId?"),
    (GOOD + ";Foo=bar", "connection string", "part 5 (7 characters) is not a known key"),
    (GOOD + ";DeviceId=dev2", "DeviceId", "appears twice"),
    (GOOD.replace("dev1", ""), "DeviceId", "is empty"),
    (GOOD.replace("DeviceId=dev1", "DeviceId = dev1"), "connection string", "spaces"),
    (GOOD.replace(";ModuleId=DefenderIotMicroAgent", ""), "ModuleId", "is missing"),
    (GOOD.replace("HostName=hub1.azure-devices.net;", ""), "HostName", "is missing"),
    (GOOD.replace("hub1.azure-devices.net", "hub1"), "HostName", "full host name"),
    (GOOD.replace("hub1.azure-devices.net", "https://hub1.azure-devices.net"), "HostName",
     "no https://"),
    (GOOD.replace("hub1.azure-devices.net", "hub_1.azure-devices.net"), "HostName",
     "not a valid DNS host name"),
    (GOOD.replace("hub1.azure-devices.net", "-hub.azure-devices.net"), "HostName",
     "not a valid DNS host name"),
    (GOOD.replace("dev1", "dev#1"), "DeviceId", "character 4 is not allowed"),
    (GOOD.replace("dev1", "d" * 129), "DeviceId", "at most 128"),
    (BASE, "connection string", "no authentication"),
    (GOOD + ";x509=true", "connection string", "both SharedAccessKey and x509"),
    (f"{BASE};x509=True", "x509", "exactly 'true'"),
    (GOOD.replace(KEY, KEY[:-1]), "SharedAccessKey", "not valid base64"),
    (GOOD.replace(KEY, KEY.rstrip("=")), "SharedAccessKey", "not valid base64"),
    (GOOD.replace(KEY, base64.b64encode(b"x" * 8).decode()), "SharedAccessKey",
     "decodes to 8 bytes"),
    (GOOD.replace(KEY, base64.b64encode(b"x" * 65).decode()), "SharedAccessKey",
     "decodes to 65 bytes"),
    (f"{BASE};SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}", "SharedAccessKeyName",
     "hub-level policy"),
    (f"{BASE};SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1",
     "SharedAccessSignature", "expires"),
])
def test_refuses_with_the_field_and_the_fix(text, field, words):
    exc = error(text)
    assert exc.label == field
    assert words in exc.message


def test_method_must_match_the_authentication():
    assert "certificate method" in error(f"{BASE};x509=true", method="connection-string").message
    assert "x509=true" in error(GOOD, method="certificate").message


def test_key_material_is_never_echoed_even_in_unknown_keys():
    exc = error(f"{BASE};{KEY}")  # a key pasted without "SharedAccessKey="
    assert "part 4" in exc.message


def test_a_bare_key_that_looks_like_a_key_name_is_not_echoed():
    token = "TKOxREbXrjk6v8BC2aFKRg"  # 16 bytes of base64: a plausible key *and* name
    exc = error(f"HostName=h.azure-devices.net;DeviceId=d;ModuleId=m;{token}==")
    assert token not in str(exc) and token[:8] not in str(exc)
    assert exc.message.startswith("part 4 (24 characters) is not a known key")
    assert "SharedAccessKey=" in exc.message  # it looks like a key without its name


@pytest.mark.parametrize("given, known", [("Hostname", "HostName"), ("sharedaccesskey",
                                                                       "SharedAccessKey")])
def test_a_mis_cased_key_names_only_the_known_key(given, known):
    exc = error(GOOD.replace(known + "=", given + "="))
    assert f"did you mean {known}?" in exc.message
    assert given not in exc.message


def test_spaces_around_an_unknown_key_do_not_echo_it():
    exc = error(f"{BASE}; TKOxREbXrjk6v8BC2aFKRg =x;SharedAccessKey={KEY}")
    assert "TKOxREbX" not in str(exc) and "part 4" in exc.message


def test_an_oversized_connection_string_is_refused_with_the_limit():
    exc = error(GOOD + ";GatewayHostName=" + "a" * 2000)
    assert exc.label == "connection string" and "at most 1024 bytes" in exc.message


def test_gateway_host_name_is_kept_and_may_be_a_short_name():
    parsed = cs.parse(GOOD + ";GatewayHostName=edge-gw")
    assert parsed.gateway_host_name == "edge-gw"
    assert "GatewayHostName=edge-gw" in parsed.canonical()


def test_id_characters_of_the_iot_hub_set_are_accepted():
    parsed = cs.parse(GOOD.replace("dev1", "a-b.c%d_e*f?g!h(i),j:k=l@m$n'o"))
    assert parsed.device_id == "a-b.c%d_e*f?g!h(i),j:k=l@m$n'o"


def test_other_module_id_is_a_warning_naming_the_expected_id():
    parsed = cs.parse(GOOD.replace("DefenderIotMicroAgent", "OtherModule"))
    assert parsed.warnings == (
        "ModuleId 'OtherModule' is not the expected DefenderIotMicroAgent, the micro agent's "
        "module identity; keep it only if this module exists on the hub on purpose",)


@pytest.mark.parametrize("module", ["DefenderIoTMicroAgent", "defenderiotmicroagent"])
def test_module_id_differing_in_case_gets_a_pointed_warning(module):
    # DefenderIoTMicroAgent: how one of Microsoft's own tutorials spells it
    parsed = cs.parse(GOOD.replace("DefenderIotMicroAgent", module), method="connection-string")
    assert parsed.warnings == (
        f"ModuleId '{module}' differs from the expected DefenderIotMicroAgent only in letter "
        "case: IDs are case-sensitive, so the hub knows it as another module; use "
        "DefenderIotMicroAgent unless you created this one on purpose",)


def test_the_expected_module_id_gets_no_warning():
    assert cs.parse(GOOD).warnings == ()


def test_from_parts_builds_an_x509_connection_string():
    text = cs.from_parts("hub1.azure-devices.net", "dev1")
    assert cs.parse(text, method="certificate").canonical() == f"{BASE};x509=true"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_parser_never_crashes_on_arbitrary_input(text):
    try:
        cs.parse(text)
    except ValidationError:
        pass


# A secret-looking token (base64 of random bytes, as a SharedAccessKey or pasted without its
# name) placed anywhere in a connection string that fails the rules: the error names positions,
# lengths and known keys only, so no 8-character piece of the token may appear in it.
_TOKEN = st.binary(min_size=12, max_size=64).map(lambda b: base64.b64encode(b).decode())
_PLACES = ["bare", "bare-unpadded", "as-key", "unknown-value", "key-cut", "key-quoted",
           "key-spaced", "key-name-cased", "host", "device", "module", "x509", "gateway",
           "policy", "signature", "twice", "key-twice", "no-equals-prefix", "trailing-junk"]


def _with_token(token: str, place: str, pos: int) -> str:
    base = ["HostName=h.azure-devices.net", "DeviceId=d", "ModuleId=m"]
    part = {"bare": token, "bare-unpadded": token.rstrip("="), "as-key": f"{token}=v",
            "unknown-value": f"Extra={token}", "key-cut": f"SharedAccessKey={token[:-3]}",
            "key-quoted": f"SharedAccessKey=\u201c{token}", "key-spaced":
            f"SharedAccessKey= {token}", "key-name-cased": f"sharedAccessKey={token}",
            "host": f"HostName={token}", "device": f"DeviceId={token}+",
            "module": f"ModuleId={token}/", "x509": f"x509={token}",
            "gateway": f"GatewayHostName={token}", "policy": f"SharedAccessKeyName={token}",
            "signature": f"SharedAccessSignature={token}", "twice": f"ModuleId={token}",
            "key-twice": f"SharedAccessKey={token};SharedAccessKey={token}",
            "no-equals-prefix": token.replace("=", "") + "x", "trailing-junk":
            f"SharedAccessKey={token}\u00e9"}[place]
    base.insert(pos % (len(base) + 1), part)
    return ";".join(base)


@settings(max_examples=400, deadline=None)
@given(token=_TOKEN, place=st.sampled_from(_PLACES), pos=st.integers(0, 3),
       as_bytes=st.booleans())
def test_no_piece_of_a_secret_looking_token_reaches_an_error(token, place, pos, as_bytes):
    text = _with_token(token, place, pos)
    try:
        cs.parse(text.encode() if as_bytes else text)
    except ValidationError as exc:
        message = str(exc)
        pieces = {token[i:i + 8] for i in range(len(token) - 7)}
        assert not [p for p in pieces if p in message], (place, message)
