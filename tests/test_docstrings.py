"""Every public function, method and class of kvmslots has a docstring.

The API reference (docs/api) is generated from the docstrings; a public member without one shows
only its signature there, which a reader notices.  Public: a name that does not start with ``_``,
at module level or inside a public class (dunders such as ``__init__`` are therefore out).  The
sources are parsed, not imported, so the check is fast and sees modules whose imports are optional.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

#: This checkout's package (not whichever kvmslots the interpreter would import).
PACKAGE = Path(__file__).resolve().parent.parent / "kvmslots"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _undocumented(node: ast.AST, prefix: str = "") -> Iterator[tuple[int, str]]:
    """(line, qualified name) of each public definition under *node* that has no docstring."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, DEFINITIONS) or child.name.startswith("_"):
            continue
        if not ast.get_docstring(child):
            yield child.lineno, prefix + child.name
        if isinstance(child, ast.ClassDef):
            yield from _undocumented(child, f"{prefix}{child.name}.")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_walked() -> None:
    names = {path.relative_to(PACKAGE).as_posix() for path in _modules()}
    assert {"__init__.py", "store.py", "storage/base.py", "pci/tracker.py", "hotplug/add.py"} <= names


def test_every_public_member_has_a_docstring() -> None:
    missing = [
        f"kvmslots/{path.relative_to(PACKAGE).as_posix()}:{line} {name}"
        for path in _modules()
        for line, name in _undocumented(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    ]
    assert not missing, f"{len(missing)} public member(s) without a docstring:\n" + "\n".join(missing)
