"""The certificate checks of the agent, made in a short-lived child process.

Interface::

    check(cert_pem, key_pem, *, device_id=None, module_id=None, now=None) -> CertificateInfo
        # what defender_setup.certificates.check returns, or raises (ValidationError)

Why: ``certificates.check`` needs python3-cryptography, whose import alone adds about 6 MB to
a process that otherwise stays under 20 MB, and a library once loaded never leaves. The agent
needs the verdict and a few facts (the thumbprint it names when the hub refuses the
certificate), not the library: a forked child makes the checks, sends the result back over a
pipe (``marshal``: plain values only) and exits. The checks are the same code and rules as
``defender-setup validate``; only the process differs.

The child is forked from a process that may run the hub connection's thread (a SIGHUP
reload). It runs only the checks, which take no lock that thread could hold, and leaves with
``os._exit`` (no atexit handlers, no flush of inherited buffers); a child that does not answer
within :data:`TIMEOUT` seconds is killed and the set counts as unreadable.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import time

from defender_setup.errors import Field, SetupError, ValidationError

TIMEOUT = 30.0  # seconds; the checks take ~0.2 s, most of it importing cryptography
MAX_ANSWER = 64 * 1024  # a CertificateInfo is well under 1 KiB
_DATES = ("not_before", "not_after")


def check(cert_pem, key_pem, *, device_id=None, module_id=None, now=None):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        status = 1
        try:
            # The runtime's signal handlers write to its wake-up pipe, which the child shares:
            # a SIGTERM for the whole unit must end the child, not speak for the parent.
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            answer = _answer(cert_pem, key_pem, device_id=device_id, module_id=module_id,
                             now=now)
            data = memoryview(marshal.dumps(answer))
            while data:
                data = data[os.write(write_end, data):]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        data = _read(read_end, pid)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    # our own child over a private pipe, and marshal of plain values only
    return _result(marshal.loads(data) if data else ("bug", "no answer"))  # noqa: S302


def _answer(cert_pem, key_pem, **kw) -> tuple:
    """In the child: ("ok", fields), ("invalid", field, message) or ("bug", type name)."""
    try:
        from defender_setup import certificates

        info = certificates.check(cert_pem, key_pem, **kw)
    except ValidationError as err:
        return ("invalid", err.field.name, err.message, err.part)  # marshal: plain values
    except Exception as err:  # a bug: reported by the parent without a traceback
        return ("bug", type(err).__name__)
    fields = {name: getattr(info, name) for name in info.__dataclass_fields__}
    for name in _DATES:
        fields[name] = fields[name].timestamp()
    return ("ok", fields)


def _read(fd: int, pid: int) -> bytes:
    data, deadline = bytearray(), time.monotonic() + TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            raise SetupError(f"the certificate checks did not finish within {TIMEOUT:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_ANSWER:
            os.kill(pid, signal.SIGKILL)
            raise SetupError("the certificate checks answered too much")


def _result(answer: tuple):
    kind = answer[0]
    if kind == "invalid":
        raise ValidationError(Field[answer[1]], answer[2], answer[3])
    if kind != "ok":
        raise RuntimeError(f"the certificate checks failed: {answer[1]}")
    import datetime

    from defender_setup.certificates import CertificateInfo

    fields = dict(answer[1])
    for name in _DATES:
        fields[name] = datetime.datetime.fromtimestamp(fields[name], datetime.timezone.utc)
    fields["warnings"] = tuple(fields["warnings"])
    return CertificateInfo(**fields)
