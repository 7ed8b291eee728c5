"""The documentation says what the code does: the exit codes and the module layout."""

import re
from pathlib import Path

from defender_setup import errors

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
CODES = {value for name, value in vars(errors).items() if name.startswith("EX_")}
AGENT_ONLY = {errors.EX_REJECTED}  # the agent process's, not a command's


def test_the_readme_table_lists_every_exit_code_of_errors_py():
    table = README[README.index("| exit code | meaning |"):]
    table = table[:table.index("\n\n")]
    assert {int(code) for code in re.findall(r"(?m)^\| (\d+) \|", table)} == CODES


def test_the_man_page_lists_every_exit_code_of_a_command():
    man = (REPO / "man/defender-setup.8").read_text()
    section = man[man.index(".SH EXIT STATUS"):man.index(".SH FILES")]
    assert {int(code) for code in re.findall(r"(?m)^\.B (\d+)$", section)} == CODES - AGENT_ONLY


def test_the_readme_layout_names_every_module():
    layout = README[README.index("Layout: `defender_setup/`"):README.index("Tests mirror")]
    modules = {p.name for p in (REPO / "defender_setup").glob("*.py")} - {"__init__.py"}
    assert {m for m in modules if f"`{m}`" not in layout} == set()
