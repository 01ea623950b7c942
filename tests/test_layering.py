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
    "teachers": {"students"},  # a teacher samples, loads and places engines as a student does
    "students": set(),
    "losses": set(),
}
# finer rules: (importer package, imported module prefix) that are refused even if allowed above
REFUSED_MODULES = {
    ("distill", "teachers.vllm"),
    ("distill", "teachers.server"),
    ("distill", "teachers.hf"),
    ("distill", "teachers.launch"),
}
# distill's phase packages never reach into each other: what two phases share lives in a
# top-level distill module (data, tasks, the loop's pieces, the losses' twins)
PHASES = ("distill.offpolicy", "distill.onpolicy", "distill.rl")
ORCHESTRATORS = ("distill/pipeline.py",)  # runs the phases in order: imports them all
LOOPS = ("distill/offpolicy/train.py", "distill/onpolicy/train.py", "distill/rl/train.py")
LOOP_LINES = 100  # each training loop's `train` reads top to bottom on one screen


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
        if top == "distill" and owner == "distill":
            mine = next((p for p in PHASES if module_name(path).startswith(p)), None)
            theirs = next((p for p in PHASES if name.startswith(p)), None)
            rel = str(path.relative_to(ROOT))
            if theirs is not None and theirs != mine and rel not in ORCHESTRATORS:
                raise AssertionError(f"{rel} reaches into the phase package {theirs} ({name})")
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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_import_cycles() -> None:
    """No first-party module imports itself through others (type-only imports included)."""
    names = {module_name(p): p for p in modules()}
    edges: dict[str, set[str]] = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c` names module a.b.c, or attribute c of module a.b
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                    for a in node.names
                ]
            found |= {t for t in targets if t in names and t != name}
        edges[name] = found
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("loop", LOOPS)
def test_training_loops_fit_on_a_screen(loop: str) -> None:
    tree = ast.parse((ROOT / loop).read_text())
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    lines = (train.end_lineno or train.lineno) - train.lineno + 1
    assert lines <= LOOP_LINES, f"{loop}: train() has {lines} lines (at most {LOOP_LINES})"
