"""The embedded default: a teacher and a student that need no download, built once and cached.

The tokenizer is a byte-level BPE with Qwen3's special tokens and chat template, trained on the
arithmetic task. The teacher (tiny Qwen3, 4 layers) is made competent by supervised fine-tuning on
the task's worked solutions in both modes: the default recipe (400 steps of 64 sequences of about
30 tokens, ~150 CPU-seconds) gives a teacher that answers most held-out problems when it
thinks and few when it does not (benchmarks/table21/README.md: what was tried and the numbers;
89-98% and 8-16% greedy on two machines). The student (2 layers) starts from random weights.
Everything is seeded: the same version and settings rebuild the same weights on one machine
(another CPU's kernels round differently, and 400 SFT steps amplify that). Built artefacts live
under the user's cache dir (DISTILL_CACHE overrides it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distill.batch import Example, collate, next_token_view
from distill.logits_loss import cross_entropy
from distill.loop import lr_at, set_lr
from distill.rundir import atomic_write_json
from distill.tasks import Problem, corpus, is_correct, problems, response_text
from students.sample import SamplingParams, sample
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer
from teachers.chat import MODES, Mode, render_prompt

VERSION = "v3"  # v3: the short column-arithmetic task (distill/tasks.py), own SFT loop


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


def reference_rows(tokenizer: object, chosen: Sequence[Problem]) -> list[dict[str, object]]:
    """The worked solutions of `chosen` in both modes, in the teacher-data schema (all kept)."""
    rows: list[dict[str, object]] = []
    for p in chosen:
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


def reference_examples(tokenizer: object, chosen: Sequence[Problem]) -> list[Example]:
    """The worked solutions of `chosen` in both modes, every response token trained."""
    return [
        Example(
            prompt_ids=r["prompt_ids"],  # type: ignore[arg-type]
            response_ids=r["response_ids"],  # type: ignore[arg-type]
            train=np.ones(len(r["response_ids"]), dtype=bool),  # type: ignore[arg-type]
        )
        for r in reference_rows(tokenizer, chosen)
    ]


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


def sft(
    model: PreTrainedModel,
    examples: Sequence[Example],
    recipe: Recipe,
    pad_id: int,
    vocab_size: int,
    log: Callable[[str], None],
) -> float:
    """Cross-entropy on the reference responses; returns the last step's loss per token.

    Batches are drawn uniformly (with replacement) so each one mixes both modes, both operations
    and all lengths. The off-policy trainer's length-bucketed batches (one mode, one length each)
    left this teacher at 3% accuracy after the same 400 steps, against 96% here (README).
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    model.train()
    loss = torch.zeros(())
    for step in range(recipe.steps):
        chosen = torch.randint(len(examples), (recipe.batch_size,), generator=generator).tolist()
        batch = collate([examples[i] for i in chosen], pad_id)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits  # (B, T, V)
        shifted, targets, mask, _, _ = next_token_view(logits, batch)
        per_token = cross_entropy(shifted, targets, vocab_size) * mask  # (B, T-1)
        loss = per_token.sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = lr_at(
            step, lr=recipe.lr, steps=recipe.steps, warmup=recipe.warmup_steps, min_ratio=0.1
        )
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"teacher SFT step {step + 1}/{recipe.steps}: loss {float(loss.detach()):.3f}")
    return float(loss.detach())


def cached(recipe: Recipe = Recipe()) -> tuple[Assets, bool]:
    """(where `recipe`'s assets live, whether they are built); builds nothing."""
    weights = {k: v for k, v in recipe.__dict__.items() if k != "check_problems"}  # the cache key
    digest = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
    root = cache_root() / "embedded" / f"{VERSION}-{digest[:10]}"
    assets = Assets(teacher=root / "teacher", student=root / "student")
    return assets, (root / "done.json").exists()


def build(recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> Assets:
    """Return the cached assets for `recipe`, building them first if needed (2-3 CPU-minutes)."""
    assets, built = cached(recipe)
    root = assets.teacher.parent
    if built:
        return assets
    shutil.rmtree(root, ignore_errors=True)  # a half-built folder from a killed build
    started = time.monotonic()
    log(f"building the embedded teacher and student in {root} (once; cached afterwards)")
    tokenizer = train_tokenizer(corpus(2000, seed=recipe.seed), vocab_size=500)
    teacher = tiny_qwen3(TINY_SHAPES[recipe.teacher_shape], tokenizer, seed=recipe.seed + 1)
    student = tiny_qwen3(TINY_SHAPES[recipe.student_shape], tokenizer, seed=recipe.seed + 2)
    save_pretrained(student, tokenizer, assets.student)
    examples = reference_examples(
        tokenizer, problems(recipe.problems, recipe.seed, "teacher-train")
    )
    pad_id = tokenizer.pad_token_id
    assert isinstance(pad_id, int), pad_id
    sft(teacher, examples, recipe, pad_id, len(tokenizer), log)
    save_pretrained(teacher.eval(), tokenizer, assets.teacher)
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
