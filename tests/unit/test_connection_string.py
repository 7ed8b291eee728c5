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
    (GOOD.replace("DeviceId=dev1;", "DeviceId=dev1;;"), "connection string", "part 3 has no '='"),
    (GOOD.replace("HostName", "hostname"), "connection string", "did you mean HostName?"),
    (GOOD.replace("ModuleId", "Moduleid"), "connection string", "did you mean ModuleId?"),
    (GOOD + ";Foo=bar", "connection string", "unknown key Foo"),
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
    assert exc.field == field
    assert words in exc.message


def test_method_must_match_the_authentication():
    assert "certificate method" in error(f"{BASE};x509=true", method="connection-string").message
    assert "x509=true" in error(GOOD, method="certificate").message


def test_key_material_is_never_echoed_even_in_unknown_keys():
    exc = error(f"{BASE};{KEY}")  # a key pasted without "SharedAccessKey="
    assert "part 4" in exc.message


def test_gateway_host_name_is_kept_and_may_be_a_short_name():
    parsed = cs.parse(GOOD + ";GatewayHostName=edge-gw")
    assert parsed.gateway_host_name == "edge-gw"
    assert "GatewayHostName=edge-gw" in parsed.canonical()


def test_id_characters_of_the_iot_hub_set_are_accepted():
    parsed = cs.parse(GOOD.replace("dev1", "a-b.c%d_e*f?g!h(i),j:k=l@m$n'o"))
    assert parsed.device_id == "a-b.c%d_e*f?g!h(i),j:k=l@m$n'o"


def test_other_module_id_is_a_warning():
    parsed = cs.parse(GOOD.replace("DefenderIotMicroAgent", "OtherModule"))
    assert "not DefenderIotMicroAgent" in parsed.warnings[0]


def test_module_id_differing_in_case_gets_a_pointed_warning():
    parsed = cs.parse(GOOD.replace("DefenderIotMicroAgent", "defenderiotmicroagent"))
    assert "only in letter case" in parsed.warnings[0]


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


@settings(max_examples=150, deadline=None)
@given(key=st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b).decode()),
       mangle=st.sampled_from(["", "cut", "quote", "junk", "dup", "case", "space"]))
def test_errors_never_echo_key_material(key, mangle):
    text = f"{BASE};SharedAccessKey={key}"
    text = {"": text, "cut": text[:-3], "quote": "\u201c" + text, "junk": text + ";\u00e9",
            "dup": text + f";SharedAccessKey={key}", "case": text.replace("Shared", "shared"),
            "space": text.replace("Key=", "Key= ")}[mangle]
    try:
        cs.parse(text)
    except ValidationError as exc:
        body = key.rstrip("=")
        assert len(body) < 4 or body not in str(exc), "key material leaked into an error"
