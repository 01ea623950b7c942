"""SIGKILL `distill generate`, `distill offpolicy` and `distill onpolicy` at seeded moments, rerun,
and end exactly where an uninterrupted run ends.

tests/test_offpolicy_kill.py kills `generate` right after whole shards. Here one harness drives all
three commands (benchmarks/reliability.py runs it 50 times per command for docs/reliability.md):
each kill lands after a seeded number of finished units (shards, or logged optimizer steps) plus a
seeded delay, so it hits model loading, the middle of a step, or a shard or checkpoint being
written. Afterwards:
- generate: the rows equal the uninterrupted run's (same keys, no duplicates, same tokens and
  top-k), every visible shard is whole, no temporary file is left;
- offpolicy/onpolicy: every loss logged for a step (steps between the last checkpoint and a kill
  are logged twice) equals the uninterrupted run's loss at that step, within tolerance, and no
  half-written checkpoint folder is left.

Processes fork from a multiprocessing forkserver that imported the CLI once (a fresh interpreter
spends 5-15 s importing torch here); they run the real typer app with real argv.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from distill.prompts import embedded_prompts
from distill.rundir import read_metrics
from distill.teacher_data import read_rows
from teachers.chat import MODES, render_prompt
from tests.conftest import TinyPair

LOSS_RTOL = 1e-4  # exact resume on CPU reproduces the losses to float rounding


def run_cli(argv: list[str]) -> None:
    """A forkserver child: the real `distill` app, one intra-op thread (tiny models, 2 cores)."""
    import torch

    from cli import app

    torch.set_num_threads(1)
    app(argv)


def context() -> ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cli", "torch", "transformers", "pyarrow.parquet"])
    return ctx


@dataclass(frozen=True, kw_only=True)
class Command:
    """One command under test: its argv, how far a run dir got, and what a finished run left."""

    name: str
    argv: Callable[[Path], list[str]]  # run_dir -> argv
    progress: Callable[[Path], int]  # finished units (shards, logged steps) in run_dir
    units: int  # units of a whole run
    delay_s: float  # largest seeded wait after the target unit


def run_once(ctx: ForkServerContext, command: Command, run_dir: Path, timeout_s: float = 600
             ) -> int:  # fmt: skip
    p = ctx.Process(target=run_cli, args=(command.argv(run_dir),))
    p.start()
    p.join(timeout=timeout_s)
    assert p.exitcode is not None, f"{command.name} did not finish in {timeout_s} s"
    return p.exitcode


def kill_round(ctx: ForkServerContext, command: Command, run_dir: Path, rng: random.Random,
               kills: int) -> int:  # fmt: skip
    """Start and SIGKILL the command `kills` times at seeded moments; return the kills landed."""
    landed = 0
    for target in sorted(rng.randrange(command.units - 1) for _ in range(kills)):
        p = ctx.Process(target=run_cli, args=(command.argv(run_dir),))
        p.start()
        while p.is_alive() and command.progress(run_dir) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, command.delay_s))
        if p.is_alive():
            p.kill()  # SIGKILL: no handler, no cleanup
            landed += 1
        p.join(timeout=60)
        check_whole(run_dir)
    return landed


def check_whole(run_dir: Path) -> None:
    """What a kill may leave at any moment: whole shards, whole JSON files."""
    for shard in run_dir.glob("teacher_data/shard-*.parquet"):
        pq.read_table(shard)
    for name in ("config.json", "ledger.json", "teacher_data/.dataset.json"):
        if (run_dir / name).exists():
            json.loads((run_dir / name).read_text())


# --- the three commands on the tiny pair -----------------------------------------------------


def write_teacher_rows(data_dir: Path, tokenizer: PreTrainedTokenizerBase, n: int) -> None:
    """`n` kept teacher rows (worked answers, both modes) in the generate schema's columns."""
    rows = []
    for i, p in enumerate(embedded_prompts(n, 0, "train")):
        mode = MODES[i % 2]
        think = "<think>\nadd the numbers\n</think>\n\n" if mode == "think" else ""
        response = tokenizer.encode(f"{think}{p.answer}<|im_end|>", add_special_tokens=False)
        rows.append({
            "key": f"{p.id}|{mode}|0", "prompt_id": p.id, "mode": mode, "sample": 0,
            "messages": [dict(m) for m in p.messages],
            "prompt_ids": render_prompt(tokenizer, list(p.messages), mode),
            "response_ids": response, "forced": [False] * len(response), "verdict": "kept",
        })  # fmt: skip
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), data_dir / "shard-00000.parquet")


def steps_logged(phase: str) -> Callable[[Path], int]:
    return lambda run_dir: len({m["step"] for m in read_metrics(run_dir) if m["phase"] == phase})


def generate_command(pair: TinyPair, prompts: Path) -> Command:
    def argv(run_dir: Path) -> list[str]:
        return ["generate", "--run-dir", str(run_dir), "--teacher", str(pair.teacher_dir),
                "--prompts", str(prompts), "--modes", "both", "--max-tokens", "10",
                "--shard-size", "2", "--store-topk", "4", "--seed", "5"]  # fmt: skip

    def shards(run_dir: Path) -> int:
        return len(list(run_dir.glob("teacher_data/shard-*.parquet")))

    return Command(name="generate", argv=argv, units=6, delay_s=0.4, progress=shards)


def offpolicy_command(pair: TinyPair) -> Command:
    def argv(run_dir: Path) -> list[str]:
        if not (run_dir / "teacher_data").exists():
            write_teacher_rows(run_dir / "teacher_data", pair.tokenizer, 16)
        return ["offpolicy", "--run-dir", str(run_dir), "--student", str(pair.student_dir),
                "--steps", "8", "--batch-size", "4", "--micro-batch-size", "2",
                "--warmup-steps", "2", "--log-every", "1", "--save-every", "3"]  # fmt: skip

    return Command(name="offpolicy", argv=argv, units=8, delay_s=0.3,
                   progress=steps_logged("offpolicy"))  # fmt: skip


def onpolicy_command(pair: TinyPair) -> Command:
    def argv(run_dir: Path) -> list[str]:
        return ["onpolicy", "--run-dir", str(run_dir), "--teacher", str(pair.teacher_dir),
                "--student", str(pair.student_dir), "--steps", "5", "--prompts-per-step", "2",
                "--max-tokens", "8", "--n-prompts", "8", "--save-every", "2"]  # fmt: skip

    return Command(name="onpolicy", argv=argv, units=5, delay_s=0.3,
                   progress=steps_logged("onpolicy"))  # fmt: skip


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(
        json.dumps({"id": p.id, "prompt": p.messages[0]["content"], "answer": p.answer}) + "\n"
        for p in embedded_prompts(n, 0, "train")
    ))  # fmt: skip
    return path


# --- comparisons -----------------------------------------------------------------------------


def same_rows(killed: Path, reference: Path) -> None:
    got, expected = read_rows(killed / "teacher_data"), read_rows(reference / "teacher_data")
    keys = [r["key"] for r in got]
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert keys == [r["key"] for r in expected], "missing or extra rows"
    assert got == expected, "a regenerated shard differs from the uninterrupted run's"
    assert not list(killed.glob("teacher_data/.shard-*.tmp")), "a temporary shard was left"


def same_losses(killed: Path, reference: Path, phase: str) -> None:
    expected = {m["step"]: m["loss"] for m in read_metrics(reference) if m["phase"] == phase}
    logged = [(m["step"], m["loss"]) for m in read_metrics(killed) if m["phase"] == phase]
    assert {s for s, _ in logged} == set(expected), "steps missing after the rerun"
    for step, loss in logged:  # replayed steps too: a resumed step must recompute the same loss
        assert math.isclose(loss, expected[step], rel_tol=LOSS_RTOL), (step, loss, expected[step])
    assert not list(killed.glob(f"{phase}/.checkpoint.tmp-*")), "a half-written checkpoint was left"


def survive(ctx: ForkServerContext, command: Command, root: Path, reference: Path, seed: int,
            kills: int) -> int:  # fmt: skip
    """One round: `kills` kills into a fresh run dir, a rerun to the end, the comparison."""
    killed = root / f"{command.name}-killed-{seed}"
    landed = kill_round(ctx, command, killed, random.Random(seed), kills)
    code = run_once(ctx, command, killed)
    assert code == run_once_code(reference), f"{command.name} rerun exited {code}"
    if command.name == "generate":
        same_rows(killed, reference)
    else:
        same_losses(killed, reference, command.name)
    return landed


def run_once_code(reference: Path) -> int:
    return int((reference / "exit_code").read_text())


def reference_run(ctx: ForkServerContext, command: Command, root: Path) -> Path:
    reference = root / f"{command.name}-reference"
    code = run_once(ctx, command, reference)
    # The random tiny teacher's responses are all truncated: generate writes every row, then
    # exits 2 naming the filter; the training commands finish with 0.
    assert code == (2 if command.name == "generate" else 0), code
    (reference / "exit_code").write_text(str(code))
    return reference


# --- the tests: a handful of kills per command -----------------------------------------------


def test_generate_survives_seeded_kills(tiny_pair: TinyPair, tmp_path: Path) -> None:
    ctx = context()
    command = generate_command(tiny_pair, write_prompts(tmp_path / "prompts.jsonl", 6))
    reference = reference_run(ctx, command, tmp_path)
    assert len(read_rows(reference / "teacher_data")) == 12
    assert survive(ctx, command, tmp_path, reference, seed=1, kills=3) >= 2


def test_offpolicy_survives_seeded_kills(tiny_pair: TinyPair, tmp_path: Path) -> None:
    ctx = context()
    command = offpolicy_command(tiny_pair)
    reference = reference_run(ctx, command, tmp_path)
    assert survive(ctx, command, tmp_path, reference, seed=2, kills=3) >= 2


def test_onpolicy_survives_seeded_kills(tiny_pair: TinyPair, tmp_path: Path) -> None:
    ctx = context()
    command = onpolicy_command(tiny_pair)
    reference = reference_run(ctx, command, tmp_path)
    assert survive(ctx, command, tmp_path, reference, seed=3, kills=3) >= 2
