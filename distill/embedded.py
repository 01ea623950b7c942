"""The embedded default: a teacher and a student that need no download, built once and cached.

The tokenizer is a byte-level BPE with Qwen3's special tokens and chat template, trained on the
arithmetic task. The teacher (tiny Qwen3, 4 layers) is made competent by fine-tuning it on the
task's worked solutions in both modes, with distill's own off-policy trainer; the student (2
layers) starts from random weights. Everything is seeded: the same version and settings rebuild
the same weights. Built artefacts live under the user's cache dir (DISTILL_CACHE overrides it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill.accounting import GpuLedger
from distill.offpolicy import train as offpolicy
from distill.rundir import atomic_write_bytes, atomic_write_json
from distill.tasks import corpus, problems, response_text
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer
from teachers.chat import Mode, render_prompt

VERSION = "v1"


@dataclass(frozen=True, kw_only=True)
class Assets:
    teacher: Path  # from_pretrained folder
    student: Path  # from_pretrained folder, same tokenizer


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How the embedded teacher is made: SFT steps on `problems` worked solutions."""

    teacher_shape: str = "tiny-teacher"
    student_shape: str = "tiny-student"
    problems: int = 4000
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0


def cache_root() -> Path:
    base = os.environ.get("DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distill"
    )
    return Path(base)


def reference_rows(tokenizer: object, n: int, seed: int) -> list[dict[str, object]]:
    """The task's worked solutions in both modes, in the teacher-data schema (all kept)."""
    rows: list[dict[str, object]] = []
    for p in problems(n, seed, "teacher-train"):
        messages = [{"role": "user", "content": p.prompt}]
        for mode in ("think", "no_think"):
            m: Mode = "think" if mode == "think" else "no_think"
            prompt_ids = render_prompt(tokenizer, messages, m)  # type: ignore[arg-type]
            text = response_text(p, thinking=m == "think")
            if m == "no_think":  # the template already closed the think block in the prompt
                text = text.split("</think>\n\n", 1)[1]
            response = tokenizer.encode(text + "<|im_end|>", add_special_tokens=False)  # type: ignore[attr-defined]
            rows.append(
                {
                    "key": f"{p.id}|{m}|0",
                    "mode": m,
                    "prompt_ids": prompt_ids,
                    "response_ids": response,
                    "forced": [False] * len(response),
                    "verdict": "kept",
                }
            )
    return rows


def build(recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> Assets:
    """Return the cached assets for `recipe`, building them first if needed (about a minute)."""
    digest = hashlib.sha256(json.dumps(recipe.__dict__, sort_keys=True).encode()).hexdigest()
    key = f"{VERSION}-{digest[:10]}"
    root = cache_root() / "embedded" / key
    assets = Assets(teacher=root / "teacher", student=root / "student")
    if (root / "done.json").exists():
        return assets
    shutil.rmtree(root, ignore_errors=True)  # a half-built folder from a killed build
    build_dir = root / "build"
    log(f"building the embedded teacher and student in {root} (once; cached afterwards)")
    tokenizer = train_tokenizer(corpus(2000, seed=recipe.seed), vocab_size=500)
    teacher = tiny_qwen3(TINY_SHAPES[recipe.teacher_shape], tokenizer, seed=recipe.seed + 1)
    student = tiny_qwen3(TINY_SHAPES[recipe.student_shape], tokenizer, seed=recipe.seed + 2)
    save_pretrained(teacher, tokenizer, build_dir / "teacher-init")
    save_pretrained(student, tokenizer, assets.student)

    rows = reference_rows(tokenizer, recipe.problems, recipe.seed)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    atomic_write_bytes(
        build_dir / "reference_data" / "shard-00000.parquet", sink.getvalue().to_pybytes()
    )
    config = offpolicy.Config(
        run_dir=build_dir,
        student=str(build_dir / "teacher-init"),
        data_dir=build_dir / "reference_data",
        output="teacher",
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        micro_batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup_steps=20,
        log_every=50,
        save_every=recipe.steps,
        seed=recipe.seed,
    )
    summary = offpolicy.train(config, GpuLedger())
    shutil.copytree(summary.checkpoint, assets.teacher)
    (assets.teacher / "trainer_state.pt").unlink()
    log(f"embedded teacher trained: final loss {summary.final_loss:.3f}")
    shutil.rmtree(build_dir)
    atomic_write_json(root / "done.json", {"recipe": recipe.__dict__, "version": VERSION})
    return assets
