"""Rollouts of one on-policy step: student samples for on-policy slots, teacher rows for the rest.

Also the checks that run before anything is loaded or written. The sampler, its seeds and the
per-mode calls are distill/sampling.py's, shared with the RL baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.onpolicy.schedule import Slot
from distill.prompts import Prompt
from distill.sampling import sample_modes
from distill.teacher_data import read_rows
from students.sample import Generation, Sampler, SamplingParams
from teachers.chat import ALL_MODES, Mode, render_prompt
from teachers.protocol import Teacher, TopK


def check_top_k(top_k: int, max_top_k: int, teacher_name: str) -> None:
    if top_k < 1 or top_k > max_top_k:
        raise DistillError(
            f"--top-k {top_k} is outside 1..{max_top_k}, what teacher {teacher_name} serves: "
            "lower --top-k, or raise the teacher's limit (vLLM: --max-logprobs / max_top_k)"
        )


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One sequence of the step: prompt ids, response, its mode and origin, then its scores."""

    prompt_ids: list[int]
    generation: Generation
    mode: Mode
    on_policy: bool
    scores: TopK | None = None
    version: int = 0  # the weight version (optimizer steps taken) whose sampler wrote it


@dataclass(frozen=True, kw_only=True)
class OffPolicyRow:
    """A kept teacher response from RUN_DIR/teacher_data, for `lmbda` > 0."""

    prompt_ids: list[int]
    generation: Generation
    mode: Mode


def check_request(top_k: int, lmbda: float, teacher: Teacher, prompts: Sequence[Prompt]) -> None:
    """Refuse what the config alone cannot: the teacher's top-k limit, an empty prompt set.

    Ranges and choices were checked when the config was built (`Config.__post_init__`)."""
    check_top_k(top_k, teacher.max_top_k, teacher.name)
    if not prompts and lmbda < 1.0:
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
        mode = next(m for m in ALL_MODES if m == r["mode"])
        out.append(OffPolicyRow(prompt_ids=list(r["prompt_ids"]), generation=gen, mode=mode))  # type: ignore[arg-type]
    return out


def sample_slots(
    slots: Sequence[Slot],
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    rows: Sequence[OffPolicyRow],
    params: dict[Mode, SamplingParams],
    *,
    samples_per_prompt: int,
    soft_switch: bool,
    thinking_budget: int | None,
    budget_sentence: str,
) -> list[Rollout]:
    """G rollouts per slot, in slot order: one sampler call per mode with `params[mode]` (the
    step's `sampling.mode_params`); slots without a prompt take their teacher `rows`."""
    G = samples_per_prompt
    out: list[Rollout | None] = [None] * (len(slots) * G)
    mine = [(j, s) for j, s in enumerate(slots) if s.prompt is not None]
    prompt_ids = [
        render_prompt(tokenizer, prompts[s.prompt].messages, s.mode, soft_switch)
        for _, s in mine
        if s.prompt is not None
        for _ in range(G)
    ]
    modes: list[Mode] = [s.mode for _, s in mine for _ in range(G)]
    gens = sample_modes(
        sampler,
        tokenizer,
        prompt_ids,
        modes,
        params,
        thinking_budget=thinking_budget,
        budget_sentence=budget_sentence,
    )
    for n, gen in enumerate(gens):
        j = mine[n // G][0]
        out[j * G + n % G] = Rollout(
            prompt_ids=prompt_ids[n], generation=gen, mode=modes[n], on_policy=True
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
