"""What a source file imports, read from its syntax tree (without importing it)."""

import ast
from pathlib import Path


def imported(path: Path) -> set[str]:
    """The module names a file's import statements name (relative ones as written)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names
