"""SIGKILL `distill generate` at seeded moments, rerun, and end with an uninterrupted run's rows.

Each run is the real command (`cli.app` with `generate ...` argv) in its own process, killed with
SIGKILL. The processes are forked from a multiprocessing forkserver that imported the CLI once:
a fresh `distill` interpreter spends 5-15 s importing torch and transformers on these machines,
which would make a few kills cost minutes. The forkserver has run no torch op before forking, so
the children are ordinary fresh processes in every other respect.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path

import pyarrow.parquet as pq

from distill import teacher_data
from distill.prompts import embedded_prompts

SHARD_SIZE = 3
PROMPTS = 9  # x 2 modes = 18 rows = 6 shards


def run_generate(argv: list[str]) -> None:
    import torch

    from cli import app

    # One thread: on a shared 2-core machine, spinning OpenMP workers make tiny runs 10x slower.
    torch.set_num_threads(1)
    app(argv)


def argv(run_dir: Path, teacher: Path, prompts: Path) -> list[str]:
    return [
        "generate", "--run-dir", str(run_dir), "--teacher", str(teacher),
        "--prompts", str(prompts), "--modes", "both", "--max-tokens", "12",
        "--shard-size", str(SHARD_SIZE), "--seed", "3",
    ]  # fmt: skip


def rows(run_dir: Path) -> list[dict[str, object]]:
    return teacher_data.read_rows(run_dir / "teacher_data")


def test_sigkill_at_seeded_moments_then_rerun_equals_an_uninterrupted_run(
    tmp_path, tiny_pair
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": p.id, "prompt": p.messages[0]["content"], "answer": p.answer}) + "\n"
            for p in embedded_prompts(PROMPTS, 0, "train")
        )
    )
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cli", "torch", "transformers", "pyarrow.parquet"])

    reference = tmp_path / "reference"
    p = ctx.Process(target=run_generate, args=(argv(reference, tiny_pair.teacher_dir, prompts),))
    p.start()
    p.join(timeout=300)
    # The random tiny teacher's responses are all truncated: the command writes every row, then
    # exits 2 naming the filter. A rerun must end the same way.
    assert p.exitcode in (0, 2)
    exit_code = p.exitcode
    expected = rows(reference)
    n_shards = PROMPTS * 2 // SHARD_SIZE
    assert len(expected) == PROMPTS * 2 and len(list(reference.glob("*/shard-*"))) == n_shards

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for target in sorted(rng.sample(range(n_shards - 2), 3)):  # shards finished before the kill
        p = ctx.Process(target=run_generate, args=(argv(killed, tiny_pair.teacher_dir, prompts),))
        p.start()
        while p.is_alive() and len(list(killed.glob("teacher_data/shard-*.parquet"))) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next shard
        if p.is_alive():
            p.kill()  # SIGKILL: no cleanup runs
            kills += 1
        p.join(timeout=60)
        for shard in killed.glob("teacher_data/shard-*.parquet"):
            pq.read_table(shard)  # every visible shard is whole: no partial rows
    assert kills >= 2, "the runs finished before the seeded kill moments; the test killed nothing"
    p = ctx.Process(target=run_generate, args=(argv(killed, tiny_pair.teacher_dir, prompts),))
    p.start()
    p.join(timeout=300)
    assert p.exitcode == exit_code

    got = rows(killed)
    keys = [r["key"] for r in got]
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert keys == [r["key"] for r in expected]
    assert got == expected  # same tokens too: an unfinished shard is regenerated identically
    assert not list(killed.glob("teacher_data/.shard-*.tmp"))  # stale temporaries were removed
