"""Imports flow one way: cli -> distill -> teachers, students, losses; losses imports only torch.

An `ast` scan of every module (function-level imports included), so a lazy import cannot
sneak an edge past the rule. Module size is checked here too (STYLE: hard cap 500 lines).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "distill", "teachers", "students", "losses")
THIRD_PARTY_UI = ("rich", "typer")

# package -> first-party packages it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "cli": {"distill", "teachers", "students"},
    "distill": {"losses", "students", "teachers"},
    "teachers": {"students"},  # teachers.hf samples with students.sample
    "students": {"teachers"},  # only teachers.protocol: the shared data types
    "losses": set(),
}
# finer rules: (importer package, imported module prefix) that are refused even if allowed above
REFUSED_MODULES = {
    ("distill", "teachers.vllm"),
    ("distill", "teachers.server"),
    ("distill", "teachers.hf"),
    ("distill", "teachers.launch"),
}
STUDENTS_MAY_IMPORT = ("teachers.protocol",)


def modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_down(path: Path) -> None:
    owner = path.relative_to(ROOT).parts[0]
    for name in imports(path):
        top = name.split(".")[0]
        if top in PACKAGES and top != owner:
            assert top in ALLOWED[owner], f"{owner} must not import {name}"
            assert (owner, name) not in REFUSED_MODULES, f"{owner} must not import {name}"
            if owner == "students":
                assert name.startswith(STUDENTS_MAY_IMPORT), f"students may not import {name}"
        if owner != "cli":
            assert top not in THIRD_PARTY_UI, f"only cli/ renders: {path} imports {name}"
        if owner == "losses":
            allowed = {"torch", "__future__", *sys.stdlib_module_names}
            assert top in allowed or top == "losses", f"losses imports only torch: {name}"
        if owner != "teachers" or path.name != "vllm.py":
            assert top != "vllm" or owner == "students", f"{path} imports vllm"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.name} has {lines} lines (hard cap 500; split it by noun)"


def test_no_utils_modules() -> None:
    assert not [p for p in modules() if p.stem in ("utils", "helpers", "misc")]
