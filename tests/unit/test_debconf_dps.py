"""defender_setup.debconf_dps: the dps answers become an enrollment, checked, then registered
on the device itself or only checked in an image build (the register step is passed in)."""

from __future__ import annotations

import base64
import io

import pytest

from defender_setup import dps
from defender_setup.debconf_bridge import Answers, question_for
from defender_setup.debconf_dps import IMAGE_STAND_IN, apply, check, enrollment_of
from defender_setup.errors import CERTIFICATE, Field, SetupError, ValidationError

SCOPE = "0ne0000ABCD"
KEY = base64.b64encode(bytes(range(32))).decode()
MACHINE = "0123456789abcdef0123456789abcdef"


def answers(**kw) -> Answers:
    base = {"method": "dps", "dps_id_scope": SCOPE, "dps_key": KEY}
    return Answers(**{**base, **kw})


def no_read(path, what):
    raise AssertionError(f"unexpected read of {path}")


@pytest.fixture
def device(tmp_path):
    """A root whose machine id is set (a booted device)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text(MACHINE + "\n")
    return tmp_path


@pytest.fixture
def image(tmp_path):
    """A root as an image ships it: the machine id not yet made."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("uninitialized\n")
    return tmp_path


class Register:
    def __init__(self, code=0):
        self.calls, self.code = [], code

    def __call__(self, root, enrollment, **kw):
        self.calls.append((root, enrollment, kw))
        return self.code


def test_a_group_key_answer_is_an_enrollment_with_the_group_flag():
    e = enrollment_of(answers(dps_group_key=True), no_read)
    assert (e.id_scope, e.attestation, e.group_key, e.key) == \
        (SCOPE, dps.SYMMETRIC_KEY, True, KEY.encode())
    assert e.endpoint == dps.GLOBAL_ENDPOINT and e.module_id == dps.DEFAULT_MODULE
    assert e.registration_id is None  # the machine id, filled in by the check
    assert KEY not in repr(e) and KEY not in repr(answers())


def test_x509_reads_the_certificate_and_key_answers():
    read = {"/c.pem": b"CERT", "/k.pem": b"KEY"}
    e = enrollment_of(answers(dps_attestation="x509", dps_key="", certificate_file="/c.pem",
                              private_key_file="/k.pem"), lambda path, what: read[path])
    assert (e.attestation, e.certificate, e.private_key, e.key) == \
        (dps.X509, b"CERT", b"KEY", None)


def test_no_new_secret_keeps_a_set_from_dps_and_is_refused_otherwise(device):
    assert enrollment_of(answers(dps_key=""), no_read) is None
    out = io.StringIO()
    register = Register()
    assert apply(answers(dps_key=""), device, out, stored_origin="dps", read=no_read,
                 deferred=None, register=register) == 0
    assert not register.calls and "kept" in out.getvalue()
    with pytest.raises(ValidationError) as err:
        check(answers(dps_key=""), device, "debconf", no_read, False)
    assert question_for(err.value, answers()) == "dps-symmetric-key"
    with pytest.raises(ValidationError) as err:
        check(answers(dps_key="", dps_attestation="x509"), device, None, no_read, False)
    assert err.value.field == CERTIFICATE


def test_on_the_device_it_registers_with_the_machine_id_and_leaves_the_restart(device):
    register, out = Register(), io.StringIO()
    assert apply(answers(dps_group_key=True), device, out, stored_origin=None, read=no_read,
                 deferred=None, register=register) == 0
    [(root, e, kw)] = register.calls
    assert root == device and e.registration_id == MACHINE and e.group_key
    assert kw == {"origin": "dps", "restart": False, "out": out,  # the trigger restarts
                  "held_back": "the package's trigger restarts and verifies the service"}


def test_in_an_image_build_it_only_checks_and_registers_nothing(image):
    register, out = Register(), io.StringIO()
    assert apply(answers(dps_group_key=True), image, out, stored_origin=None, read=no_read,
                 deferred="DPKG_ROOT is set (/img)", register=register) == 0
    assert not register.calls
    said = out.getvalue()
    assert "first boot" in said and "Nothing was stored" in said and KEY not in said
    assert not (image / "var").exists()


def test_in_an_image_build_a_bad_answer_is_still_refused(image):
    with pytest.raises(ValidationError) as err:
        check(answers(dps_id_scope="one0000ABCD"), image, None, no_read, True)
    assert question_for(err.value, answers()) == "dps-id-scope"
    # ...and the machine id is not asked of an image: a stand-in is checked instead
    check(answers(), image, None, no_read, True)
    assert dps.check_registration_id(IMAGE_STAND_IN) == IMAGE_STAND_IN


def test_on_the_device_an_unset_machine_id_goes_back_to_the_registration_id(image):
    with pytest.raises(ValidationError) as err:
        check(answers(), image, None, no_read, False)
    assert question_for(err.value, answers()) == "dps-registration-id"


@pytest.mark.parametrize("bad, question", [
    ({"dps_id_scope": "0ne00"}, "dps-id-scope"),
    ({"dps_registration_id": "Has Spaces"}, "dps-registration-id"),
    ({"dps_attestation": "tpm"}, "dps-attestation"),
    ({"dps_key": "not base64!"}, "dps-symmetric-key"),
    ({"dps_endpoint": "https://x/"}, "dps-endpoint"),
    ({"module_id": "bad;module"}, "module-id"),
])
def test_each_bad_answer_goes_back_to_its_question(device, bad, question):
    with pytest.raises(SetupError) as err:
        check(answers(**bad), device, None, no_read, False)
    assert question_for(err.value, answers()) == question
    assert KEY not in str(err.value)


@pytest.mark.parametrize("field, question", [
    (Field.DPS_ID_SCOPE, "dps-id-scope"), (Field.DPS_REGISTRATION_ID, "dps-registration-id"),
    (Field.DPS_ATTESTATION, "dps-attestation"), (Field.DPS_KEY, "dps-symmetric-key"),
    (Field.DPS_ENDPOINT, "dps-endpoint"), (Field.DPS_ENROLLMENT, "dps-id-scope"),
    (CERTIFICATE, "certificate-file"), (None, "dps-id-scope"),
])
def test_dps_errors_are_routed_by_their_field(field, question):
    # DPS's own refusals (unauthorized: the key; disabled: the enrollment) route the same way.
    error = SetupError("the endpoint, the key, the certificate", field)
    assert question_for(error, answers()) == question


class Unreachable(Register):
    def __call__(self, root, enrollment, **kw):
        from defender_setup.dpsclient import DpsError

        self.calls.append(enrollment)
        raise DpsError(self.reason, "cannot reach DPS 127.0.0.1:9: connection refused")


@pytest.mark.parametrize("reason, strict, fails", [
    ("unreachable", False, False), ("throttled", False, False),
    ("unreachable", True, True), ("unauthorized", False, True), ("disabled", False, True),
])
def test_dps_out_of_reach_leaves_the_device_unconfigured_and_the_run_going(
        device, reason, strict, fails):
    register, out = Unreachable(), io.StringIO()
    register.reason = reason
    run = lambda: apply(answers(), device, out, stored_origin=None,  # noqa: E731
                        read=no_read, deferred=None, register=register, strict=strict)
    if fails:
        with pytest.raises(SetupError):
            run()
    else:
        assert run() == 0
        assert "not registered" in out.getvalue() and "dpkg-reconfigure" in out.getvalue()
    assert register.calls
