"""defender_setup.schema: the versions' fields, pinned once released, and listed in the README.

The real documents are compared with the newest version in tests/functional/test_schema.py.
"""

import hashlib
import re
from pathlib import Path

import pytest

from defender_setup import schema

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
HISTORIES = {"status": schema.STATUS_HISTORY, "check": schema.CHECK_HISTORY}

# The fields of each version fleet tools may have seen, as a digest: a version's fields never
# change once another version follows it (the newest may be pinned too, and is compared with
# the real output). Adding version N+1: pin N here, with the line the failing test prints.
PINNED = {
    ("status", 1): "46f939f9c17d1eaf",
    ("check", 1): "5fb31e182764d6a2",
}


def digest(fields) -> str:
    return hashlib.sha256(" ".join(sorted(fields)).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", HISTORIES)
def test_versions_count_up_from_1_and_each_line_changes_something_real(name):
    history = HISTORIES[name]
    assert [number for number, _ in history] == list(range(1, len(history) + 1))
    found: set = set()
    for number, change in history:
        items = change.split()
        assert items, f"{name} version {number} changes nothing"
        for item in items:
            assert item[0] in "+-", f"{name} version {number}: {item!r} needs + or -"
            if item[0] == "+":
                assert item[1:] not in found, f"{name} version {number} adds {item[1:]} again"
                found.add(item[1:])
            else:
                assert item[1:] in found, f"{name} version {number} removes unknown {item[1:]}"
                found.discard(item[1:])
    assert frozenset(found) == schema.fields(history)


@pytest.mark.parametrize("name", HISTORIES)
def test_released_versions_keep_their_fields(name):
    history = HISTORIES[name]
    for number, _ in history:
        got = digest(schema.fields(history, number))
        if (name, number) not in PINNED:
            assert number == schema.version(history), (
                f"pin {name} version {number} in tests/unit/test_schema.py: "
                f'("{name}", {number}): "{got}",')
            continue
        assert got == PINNED[name, number], (
            f"the fields of {name} version {number} changed: versions are never edited; "
            "append a line with the next version to defender_setup/schema.py instead")


def test_the_readme_lists_every_field_of_the_newest_versions():
    section = README[README.index("### JSON output"):]
    section = section[:section.index("\n## ")]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"(?m)^\| `([^`]+)` \|.*$", section)}
    missing = []
    for name, history in HISTORIES.items():
        for field in schema.fields(history):
            top, _, rest = field.partition(".")
            leaf = field.rsplit(".", 1)[-1]
            if field not in rows and f"`{leaf}`" not in rows.get(top, ""):
                missing.append(f"{name}: {field}")
    assert missing == []
    assert f"`schemaVersion` | `{schema.version(schema.CHECK_HISTORY)}`" in section
    assert section.count(f"`schemaVersion` | `{schema.version(schema.STATUS_HISTORY)}`") >= 1


def test_paths_name_list_items_and_leave_maps_alone():
    history = ((1, "+a +a.b +files{} +items +items[].id"),)
    doc = {"a": {"b": None}, "files": {"/var/x": "0600"}, "items": [{"id": 1}, {"id": 2}],
           "new": {"deep": 1}}
    assert schema.paths(doc, history) == {"a", "a.b", "files{}", "items", "items[].id", "new",
                                          "new.deep"}


def test_documents_carry_their_version():
    from defender_setup.checks import CheckResult

    assert schema.check_document([CheckResult("x", "d", "ok")]) == {
        "schemaVersion": 1, "checks": [{"id": "x", "description": "d", "status": "ok",
                                        "message": "", "exit_code": 0}]}
    assert schema.status_document({"method": None}) == {"schemaVersion": 1, "method": None}
