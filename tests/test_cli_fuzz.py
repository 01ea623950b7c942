"""A fuzzed command line: every option of every command, drawn by hypothesis, through the CLI.

Each case invokes the real typer app (in process, typer's CliRunner) with values drawn for the
command's options from its own signature: numbers at and beyond their bounds, negative, NaN and
infinities, int64 overflow, empty and odd strings (NUL, whitespace, unicode, option-like), wrong
and right paths, malformed and unreachable URLs, and every Literal choice next to wrong ones, so
combinations conflict. Commands that do work run with `--dry-run`. Every case must end with exit
code 0 or 2, no traceback in the output, and the run directory, the model cache and the prompt
file byte-for-byte as before; nothing new may appear beside them.

Seeded (derandomize): the same cases on every run. CI: DISTILL_FUZZ_EXAMPLES per command (12,
about 40 s on 2 cores); locally e.g. `DISTILL_FUZZ_EXAMPLES=300 pytest tests/test_cli_fuzz.py`.
docs/reliability.md gives the counts of the last long run.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import typer
from huggingface_hub import constants as hub_constants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from distill import embedded
from tests.conftest import TinyPair
from tests.test_reliability_kills import write_teacher_rows

EXAMPLES = int(os.environ.get("DISTILL_FUZZ_EXAMPLES", "12"))
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TRIED: dict[str, dict[int, int]] = {}  # command -> exit code -> cases (printed with pytest -s)


@dataclass(frozen=True)
class World:
    """Files the fuzzer points options at, and the folders that must stay untouched."""

    root: Path
    run_dir: Path
    cache: Path
    pair: TinyPair
    prompts: Path


def commands() -> list[tuple[str, ...]]:
    """Every leaf command's path: ('generate',), ('teacher', 'check'), ..."""
    out: list[tuple[str, ...]] = []

    def walk(typer_app: typer.Typer, prefix: tuple[str, ...]) -> None:
        for info in typer_app.registered_commands:
            assert info.callback is not None
            out.append((*prefix, info.name or info.callback.__name__.replace("_", "-")))
        for group in typer_app.registered_groups:
            assert group.typer_instance is not None and group.name is not None
            walk(group.typer_instance, (*prefix, group.name))

    walk(app, ())
    return out


def callback(path: tuple[str, ...]) -> Any:
    typer_app = app
    for name in path[:-1]:
        typer_app = next(g.typer_instance for g in typer_app.registered_groups if g.name == name)
        assert typer_app is not None
    for info in typer_app.registered_commands:
        if (info.name or info.callback.__name__.replace("_", "-")) == path[-1]:  # type: ignore[union-attr]
            return info.callback
    raise KeyError(path)


ODD_TEXT = ["", " ", "\t", "embedded", "a\x00b", "x" * 300, "café ∑", "-", "--", "--help",
            "../..", "/", "/nonexistent/model", "8B", "0.6B-Base", "Qwen/Qwen3-0.6B",
            "tiny-student", "{}", "'", "prompt", "answer"]  # fmt: skip
URLS = ["http://127.0.0.1:1", "http://127.0.0.1:99999", "foo:bar", "http://", "ftp://[::1]",
        "http://[::1", "127.0.0.1:8000", "http://127.0.0.1:0", "https://[::1]:1/v", ""]  # fmt: skip
INTS = ["0", "1", "2", "3", "7", "64", "-1", "-2", str(2**63 - 1), str(2**63), str(-(2**63) - 1),
        "100000000000000000000000000000", "1.5", "abc", "", "1e3"]  # fmt: skip
FLOATS = ["nan", "inf", "-inf", "-1", "0", "-0.0", "1", "1.5", "0.5", "1e-9", "1e308", "2e308",
          "abc", "", "0x10"]  # fmt: skip


def base_type(hint: Any) -> Any:
    if get_origin(hint) is typing.Annotated:
        hint = get_args(hint)[0]
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (typing.Union, type(int | None)) and len(args) == 1:
        return base_type(args[0])
    return hint


def option_name(param: inspect.Parameter, hint: Any) -> str:
    """The flag typer derives, or the one declared (`--json`)."""
    for extra in get_args(hint)[1:] if get_origin(hint) is typing.Annotated else ():
        decls = getattr(extra, "param_decls", None)
        if decls:
            return str(decls[0]).split("/")[0]
    return "--" + param.name.replace("_", "-")


def is_argument(hint: Any) -> bool:
    extras = get_args(hint)[1:] if get_origin(hint) is typing.Annotated else ()
    return any(type(e).__name__ == "ArgumentInfo" for e in extras)


def values_for(name: str, kind: Any, world: World) -> st.SearchStrategy[list[str]]:
    """Strategy of argv words (value only) for one option of type `kind`."""
    pair = world.pair
    good = [str(pair.teacher_dir), str(pair.student_dir), str(world.prompts), str(world.root)]
    text = st.sampled_from(good) | st.sampled_from(ODD_TEXT) | st.text(max_size=8)
    if "url" in name:
        return st.lists(st.sampled_from(URLS) | st.text(max_size=12), min_size=1, max_size=2)
    if kind is bool:
        return st.just([])
    if kind is int:
        return st.sampled_from(INTS).map(lambda v: [v]) | st.integers(-5, 10**6).map(
            lambda v: [str(v)]
        )
    if kind is float:
        return st.sampled_from(FLOATS).map(lambda v: [v]) | st.floats().map(lambda v: [repr(v)])
    if get_origin(kind) is Literal:
        choices = [str(c) for c in get_args(kind)]
        odd = ["", "bogus", choices[0].upper(), " " + choices[0]]
        return st.sampled_from(choices + odd).map(lambda v: [v])
    if get_origin(kind) is list:
        return st.lists(text, min_size=1, max_size=2)
    return text.map(lambda v: [v])


def argv(path: tuple[str, ...], world: World) -> st.SearchStrategy[list[str]]:
    """The command, its run dir and --dry-run, and up to 6 of its options with drawn values
    (the rest at their defaults, which reach every check: 'embedded' is the tiny pair here)."""
    fn = callback(path)
    hints = typing.get_type_hints(fn, include_extras=True)
    fixed: list[str] = list(path)
    options: list[st.SearchStrategy[list[str]]] = []
    for param in inspect.signature(fn).parameters.values():
        hint = hints[param.name]
        kind = base_type(hint)
        if param.name == "dry_run":
            fixed.append("--dry-run")
        elif param.name == "run_dir":  # the directory that must stay untouched
            fixed += (
                [str(world.run_dir)] if is_argument(hint) else ["--run-dir", str(world.run_dir)]
            )
        elif is_argument(hint):  # report compare RUNS...: drawn below, after the options
            run = str(world.run_dir)
            options.append(st.lists(st.sampled_from([run, *ODD_TEXT[:4]]), min_size=1, max_size=2))
        elif kind is bool:
            flag = option_name(param, hint)
            no = "--no-" + flag.removeprefix("--")
            options.append(st.sampled_from([[flag], [no]]) if flag != "--json" else st.just([flag]))
        else:
            flag = option_name(param, hint)
            if param.default is inspect.Parameter.empty:  # required: a good value first
                good = str(world.pair.teacher_dir if "teacher" in flag else world.pair.student_dir)
                fixed += [flag, good]
            value = values_for(param.name, kind, world)
            options.append(value.map(lambda vs, f=flag: [w for v in vs for w in (f, v)]))
    chosen = st.lists(st.sampled_from(range(len(options))), max_size=6, unique=True)
    drawn = chosen.flatmap(lambda idx: st.tuples(*(options[i] for i in sorted(idx))))
    return drawn.map(lambda parts: fixed + [w for part in parts for w in part])


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A run dir holding earlier work, a prompt file, and an embedded cache that is the tiny
    pair (so 'embedded' resolves in milliseconds, as a built cache does)."""
    root = tmp_path_factory.mktemp("fuzz")
    scratch = tmp_path_factory.mktemp("fuzz-cwd")  # relative paths (a --plot file) land here
    saved = {k: os.environ.get(k) for k in ("DISTILL_CACHE", "HF_HUB_OFFLINE")}
    os.environ["DISTILL_CACHE"] = str(root / "cache")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id is looked up in the local cache only
    offline = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True  # read at import; the environment alone is too late
    cwd = os.getcwd()
    os.chdir(scratch)
    assets, _ = embedded.cached()
    shutil.copytree(tiny_pair.teacher_dir, assets.teacher)
    shutil.copytree(tiny_pair.student_dir, assets.student)
    (assets.teacher.parent / "done.json").write_text("{}")
    run = root / "run"
    run.mkdir()
    (run / "witness.txt").write_text("earlier work")
    write_teacher_rows(run / "teacher_data", tiny_pair.tokenizer, 24)  # offpolicy's input
    shutil.copytree(tiny_pair.student_dir, run / "offpolicy" / "checkpoint")  # onpolicy's
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
            for i in range(12)
        )  # fmt: skip
    )
    yield World(root, run, root / "cache", tiny_pair, prompts)
    os.chdir(cwd)
    hub_constants.HF_HUB_OFFLINE = offline
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    total = sum(n for codes in TRIED.values() for n in codes.values())
    print(f"\nfuzz cases tried: {total}; by command and exit code: {TRIED}")


def check(path: tuple[str, ...], world: World, args: list[str]) -> None:
    """One command line: exit 0 or 2, no traceback, nothing written."""
    before = snapshot(world.root)
    entries = sorted(os.listdir(world.root))
    result = runner.invoke(app, args)
    codes = TRIED.setdefault(" ".join(path), {})
    codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
    out = result.output
    assert result.exit_code in (0, 2), f"exit {result.exit_code} for {args}:\n{out[-3000:]}"
    assert "Traceback" not in out, f"traceback for {args}:\n{out[-3000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args}: {result.exception!r}"
    )
    if result.exit_code == 2:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{args}:\n{out[-3000:]}"
    assert sorted(os.listdir(world.root)) == entries, f"{args} created files"
    assert snapshot(world.root) == before, f"{args} changed files"


@pytest.mark.parametrize("path", commands(), ids=lambda p: " ".join(p))
def test_fuzzed_command_line(path: tuple[str, ...], world: World) -> None:
    """Exit 0 or 2, no traceback, nothing written, for every drawn command line."""
    names = set(inspect.signature(callback(path)).parameters) - {"run_dir", "dry_run"}
    if not names:  # nothing to draw (report show RUN_DIR): the one command line there is
        check(path, world, [*path, str(world.run_dir)])
        return

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # seeded: the same cases on every run
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(args=argv(path, world))
    def case(args: list[str]) -> None:
        check(path, world, args)

    case()
