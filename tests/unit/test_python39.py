"""The package runs on Debian 11's Python 3.9: no annotation may need 3.10 at run time.

``str | None`` in an annotation is evaluated when the function is defined, and raises
``TypeError`` on 3.9, unless the module defers annotations (``from __future__ import
annotations``). Debian 11 is a target release; this machine's Python is 3.11, so the check
reads the source instead of running it.
"""

import ast
from pathlib import Path

import defender_setup

PACKAGE = Path(defender_setup.__file__).parent


def _has_union(node) -> bool:
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))


def _annotations(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                        args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def test_no_pep604_union_is_evaluated_at_run_time():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        deferred = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                       any(a.name == "annotations" for a in n.names) for n in tree.body)
        if not deferred and any(_has_union(a) for a in _annotations(tree)):
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert offenders == [], f"add 'from __future__ import annotations' to {offenders}"
