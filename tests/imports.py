"""What a source file imports, read from its syntax tree (without importing it)."""

import ast
from pathlib import Path


def imported(path: Path, *, at_runtime: bool = False) -> set[str]:
    """The module names a file's import statements name (relative ones as written);
    `at_runtime`: not those under `if TYPE_CHECKING:`, which name types only."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if at_runtime:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                skipped.update(id(n) for n in ast.walk(node))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names
