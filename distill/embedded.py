"""The embedded default: a teacher and a student that need no download, built once and cached.

The tokenizer is a byte-level BPE with Qwen3's special tokens and chat template, trained on the
arithmetic task. The teacher (tiny Qwen3, 4 layers) is made competent by fine-tuning it on the
task's worked solutions in both modes, with distill's own off-policy trainer: the default recipe
(400 steps of 64 sequences of about 40 tokens) takes about two CPU-minutes and gives a teacher
that answers most held-out problems in thinking mode and few without thinking
(benchmarks/table21/README.md: what was tried and the numbers). The student (2 layers) starts
from random weights. Everything is seeded: the same version and settings rebuild
the same weights. Built artefacts live under the user's cache dir (DISTILL_CACHE overrides it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.accounting import GpuLedger
from distill.offpolicy import train as offpolicy
from distill.rundir import atomic_write_bytes, atomic_write_json
from distill.tasks import corpus, is_correct, problems, response_text
from students.sample import sample
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer
from teachers.chat import MODES, Mode, render_prompt
from teachers.protocol import SamplingParams

VERSION = "v2"  # v2: the short column-arithmetic task (distill/tasks.py)


@dataclass(frozen=True, kw_only=True)
class Assets:
    teacher: Path  # from_pretrained folder
    student: Path  # from_pretrained folder, same tokenizer


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How the embedded teacher is made: SFT steps on `problems` worked solutions."""

    teacher_shape: str = "tiny-teacher"
    student_shape: str = "tiny-student"
    problems: int = 5000  # x 2 modes = 10,000 sequences: ~2 epochs of 400 x 64
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3  # 1e-2 learnt the thinking steps three times slower (README)
    warmup_steps: int = 20
    check_problems: int = 64  # held-out problems the built teacher is checked on (logged)
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


@torch.no_grad()
def greedy_accuracy(model_dir: Path, n: int, seed: int = 0) -> dict[str, float]:
    """Share of `n` held-out problems answered right with greedy decoding, per mode."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    held = problems(n, seed, "eval")
    out: dict[str, float] = {}
    for mode in MODES:
        prompts = [
            render_prompt(tokenizer, [{"role": "user", "content": p.prompt}], mode) for p in held
        ]
        gens = sample(
            model,
            prompts,
            SamplingParams(temperature=0.0, max_tokens=48),  # the longest response is ~30 tokens
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(tokenizer.pad_token_id),
            vocab_size=len(tokenizer),
        )
        texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
        out[mode] = sum(is_correct(t, p.answer) for t, p in zip(texts, held, strict=True)) / n
    return out


def build(recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> Assets:
    """Return the cached assets for `recipe`, building them first if needed (2-3 CPU-minutes)."""
    digest = hashlib.sha256(json.dumps(recipe.__dict__, sort_keys=True).encode()).hexdigest()
    key = f"{VERSION}-{digest[:10]}"
    root = cache_root() / "embedded" / key
    assets = Assets(teacher=root / "teacher", student=root / "student")
    if (root / "done.json").exists():
        return assets
    shutil.rmtree(root, ignore_errors=True)  # a half-built folder from a killed build
    build_dir = root / "build"
    started = time.monotonic()
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
        warmup_steps=min(recipe.warmup_steps, recipe.steps),
        log_every=100,
        save_every=recipe.steps,
        seed=recipe.seed,
    )

    def progress(phase: str, step: int, total: int, metrics: Mapping[str, float]) -> None:
        if step % 100 == 1 or step == total:
            log(f"teacher SFT step {step}/{total}: loss {metrics['loss']:.3f}")

    summary = offpolicy.train(config, GpuLedger(), progress)
    shutil.copytree(summary.checkpoint, assets.teacher)
    (assets.teacher / "trainer_state.pt").unlink()
    shutil.rmtree(build_dir)
    accuracy = greedy_accuracy(assets.teacher, recipe.check_problems)
    seconds = time.monotonic() - started
    log(
        f"embedded teacher built in {seconds:.0f} s: greedy accuracy on {recipe.check_problems} "
        f"held-out problems {accuracy['think']:.0%} thinking, {accuracy['no_think']:.0%} not"
    )
    atomic_write_json(
        root / "done.json",
        {"recipe": recipe.__dict__, "version": VERSION, "seconds": seconds, "accuracy": accuracy},
    )
    return assets
