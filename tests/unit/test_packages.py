"""The split into two binary packages: every module ``defender-setup`` imports ships in it.

``defender-setup`` runs alone next to Microsoft's agent, and its probe and ``check`` use the
hub connection of ``agent/``: a module they import that ships only in ``defender-setup-agent``
is an ImportError on exactly those devices (and in the maintainer scripts). The .install files
are read as dh_install reads them; imports are found in the source, transitively.
"""

import ast
import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "defender_setup"
PREFIX = "usr/lib/python3*/dist-packages/"


def shipped(package: str) -> set[str]:
    """Module names (``defender_setup.agent.hub``) that debian/<package>.install ships."""
    patterns = [line.split()[0][len(PREFIX):] for line in
                (REPO / "debian" / f"{package}.install").read_text().splitlines()
                if line.startswith(PREFIX) and line.endswith(".py")]
    names = set()
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(REPO))
        if any(fnmatch.fnmatchcase(rel, p) and rel.count("/") == p.count("/")
               for p in patterns):
            names.add(rel[:-3].replace("/", ".").removesuffix(".__init__"))
    return names


def imports(module: str) -> set[str]:
    """The defender_setup modules ``module`` imports (absolute or relative, any depth)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("defender_setup")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("defender_setup"):
                continue
            found.add(base)
            for alias in node.names:  # "from . import x": x may be a module
                candidate = f"{base}.{alias.name}"
                if (REPO / (candidate.replace(".", "/") + ".py")).exists():
                    found.add(candidate)
    return found


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += imports(module) - seen
    return seen


def test_every_module_defender_setup_imports_ships_in_defender_setup():
    ours = shipped("defender-setup")
    missing = closure(ours) - ours
    assert not missing, (f"imported by defender-setup's modules but not shipped in it: "
                         f"{sorted(missing)}; list them in debian/defender-setup.install")


def test_every_module_ships_in_exactly_one_package():
    ours, agent = shipped("defender-setup"), shipped("defender-setup-agent")
    every = {str(p.relative_to(REPO))[:-3].replace("/", ".").removesuffix(".__init__")
             for p in PACKAGE.rglob("*.py")}
    assert not ours & agent, f"in both packages: {sorted(ours & agent)}"
    assert every == ours | agent, f"in no package: {sorted(every - ours - agent)}"
