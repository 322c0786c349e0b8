"""The import graph of the product's packages, read from the source with ``ast``.

Every import counts: at module level, inside a function, under ``TYPE_CHECKING``, relative ones, and
``importlib.import_module("name")`` with a literal name. Nothing is imported to read it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    """``gateway/store/store.py`` -> ``gateway.store.store``; ``gateway/__init__.py`` -> ``gateway``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files(package: str, root: Path = ROOT) -> list[Path]:
    """Every ``.py`` file of ``package`` (a top-level folder of ``root``), sorted."""
    return sorted((root / package).rglob("*.py"))


def imports_of(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file at ``path``."""
    module = module_name(path, root)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def private_names_imported(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """``(line, "module.name")`` of every ``from module import _name`` in the file (dunders aside)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield node.lineno, f"{node.module}.{alias.name}"
