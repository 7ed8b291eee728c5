"""The JSON documents of ``status --json`` and ``check --json``: their fields, by version.

Interface::

    status_document(report: dict) -> dict       # {"schemaVersion": N, **report}
    check_document(results) -> dict             # {"schemaVersion": N, "checks": [...]}
    fields(history, version=None) -> frozenset  # the fields of a version (default: the last)
    version(history) -> int
    paths(document, history) -> set             # the fields a real document holds

Fleet tools parse these documents, so their shape is a versioned interface: a field added,
removed or renamed is a new ``schemaVersion``. Each history below is one line per version
saying what that version changed; the fields of a version are the sum of the lines up to it.
A test compares the last version with the real output of both commands, so a field changed
without a line here fails it.

A field is a dotted path: ``identity.hub``; ``checks[].id`` is a field of every item of the
list ``checks``; ``files{}`` is an object whose keys are data (file paths), not fields. A value
may be null where the README says so. Check ids are values, not fields: a new check is no
new version (consumers ignore ids they do not know).

To add a field: put it in the output and append ONE line with the next number, e.g.
``(2, "+agent +agent.name +agent.version"),``; to rename one: ``(3, "-agent.name +agent.id"),``.
Then list it in the README ("JSON output").
"""

from __future__ import annotations

SCHEMA_VERSION = "schemaVersion"

CHECK_HISTORY = (
    # 1: the document was a bare list of checks before
    (1, "+schemaVersion +checks +checks[].id +checks[].description +checks[].status "
        "+checks[].message +checks[].exit_code"),
)

STATUS_HISTORY = (
    (1, "+schemaVersion +agent +agent.package +agent.version +agent.microsoft +agent.summary "
        "+agent_dir +method +problem +warnings +files{} +previous_generation "
        "+interrupted_update "
        "+identity +identity.hub +identity.device +identity.module +identity.gateway "
        "+certificate +certificate.subject +certificate.issuer +certificate.not_before "
        "+certificate.not_after +certificate.sha1_thumbprint +certificate.sha256_thumbprint "
        "+certificate.key +certificate.chain_length "
        "+sealing +sealing.sealed +sealing.keys +sealing.pending +sealing.plain_previous "
        "+sealing.summary "
        "+origin +origin.source +origin.time "
        "+service +service.active +service.summary +service.status_text "
        "+service.invocation_id +service.main_pid +service.n_restarts +service.enabled "
        "+last_import +last_import.time +last_import.source +last_import.from{} "
        "+last_import.identity +last_import.identity.method +last_import.identity.hub "
        "+last_import.identity.device +last_import.identity.module +last_import.result "
        "+last_import.message +last_import.exit_code +last_import.folder "
        "+dps +dps.id_scope +dps.registration_id +dps.endpoint +dps.attestation +dps.group_key "
        "+dps.module_id +dps.assigned_hub +dps.device_id +dps.substatus +dps.registered "
        "+dps.device_key_kept"),
)


def version(history) -> int:
    return history[-1][0]


def fields(history, upto: int | None = None) -> frozenset:
    """The fields of version ``upto`` (the last one when None)."""
    found: set = set()
    for number, change in history:
        if upto is not None and number > upto:
            break
        for item in change.split():
            (found.add if item[0] == "+" else found.discard)(item[1:])
    return frozenset(found)


def status_document(report: dict) -> dict:
    return {SCHEMA_VERSION: version(STATUS_HISTORY), **report}


def check_document(results) -> dict:
    return {SCHEMA_VERSION: version(CHECK_HISTORY), "checks": [r.as_dict() for r in results]}


def paths(document, history) -> set:
    """The fields ``document`` holds, named as in ``history`` (for the tests and tools that
    compare a real document with its version)."""
    maps = {name[:-2] for name in fields(history) if name.endswith("{}")}
    found: set = set()

    def walk(value, prefix: str) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, prefix + "[]")
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{prefix}.{key}" if prefix else key
                if path in maps:
                    found.add(path + "{}")
                    continue
                found.add(path)
                walk(item, path)

    walk(document, "")
    return found
