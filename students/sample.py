"""Batched sampling from a transformers causal LM with a KV cache and an explicit torch.Generator.

This is the CPU/small-run sampler for on-policy distillation and the generator behind
`teachers.hf.HFTeacher`. It never samples a padded head row (ids >= the tokenizer's length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from students.memory import release_free_memory
from students.weight_sync import SyncStats

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One decoding setting. `top_k=0` and `top_p=1.0` disable those filters; T=0 is greedy."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    presence_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.temperature >= 0.0, self.temperature
        assert 0.0 < self.top_p <= 1.0, self.top_p
        assert self.top_k >= 0 and self.max_tokens >= 1, (self.top_k, self.max_tokens)


# The paper's presets (Qwen3 report §4; docs/facts.md). Presence penalty 1.5 is the report's
# suggestion for non-thinking mode.
THINKING_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
NON_THINKING_SAMPLING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One completion. `forced` marks tokens inserted by the caller (the budget sentence)."""

    token_ids: np.ndarray  # (L,) int32, completion only (no prompt)
    finish_reason: FinishReason  # "stop": eos emitted (and kept as the last id); "length": cut off
    forced: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (L,) bool

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        if self.forced.shape[0] == 0 and n:  # the default: nothing was forced
            object.__setattr__(self, "forced", np.zeros(n, dtype=bool))
        elif self.forced.shape[0] != n:
            raise ValueError(f"forced has {self.forced.shape[0]} entries for {n} tokens")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of (B, V) logits; removed ids get -inf.

    With top-k on, top-p runs on the k survivors only (their renormalised mass, as before): at
    Qwen3's 151,936 rows, sorting and soft-maxing the whole row every token cost more than
    the filter itself.
    """
    logits = logits.float() / params.temperature
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        vals, idx = torch.topk(logits, params.top_k, dim=-1)  # (B, k), sorted descending
        if params.top_p < 1.0:
            vals = vals.masked_fill(_nucleus_drop(vals, params.top_p), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(
            -1, order, _nucleus_drop(sorted_logits, params.top_p)
        )
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _nucleus_drop(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Of logits sorted descending, those outside the smallest prefix whose mass reaches top_p:
    drop ids whose *preceding* mass already does."""
    p = sorted_logits.softmax(-1)
    return (p.cumsum(-1) - p) >= top_p


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One id per row of (B, V) probabilities, by inverting each row's cumulative sum.

    The same distribution as `torch.multinomial(probs, 1)`, which on CPU took 10.2 ms for 4 rows
    of Qwen3's 151,669 ids (a tenth of a Qwen3-0.6B decode step) and 42 for 16, where this takes
    0.6 and 3.1 (`benchmarks/sampling.py`, tcmalloc). The sum runs in float64, so an id's chance
    is its probability to ~1e-16 of the row's mass (float32 would round ids below ~6e-8 of it to
    nothing). An id of probability 0 (filtered out) adds nothing to the sum, so no draw below the
    total lands on it; a draw rounded up to the total goes to the last id of nonzero probability.
    """
    cdf = probs.double().cumsum(-1)  # (B, V), nondecreasing
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator)
    idx = torch.searchsorted(cdf, u * total, right=True).squeeze(-1)  # (B,): cdf[idx] > u*total
    over = idx >= cdf.shape[-1]
    if bool(over.any()):  # u * total rounded to the total: chance ~1e-16 a row
        idx = torch.where(over, (cdf < total).sum(-1), idx)  # the last id of nonzero probability
    return idx


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int = 64,
) -> list[Generation]:
    """One completion per prompt. Same prompts, params and batch_size give the same tokens."""
    assert len(prompts) > 0 and all(len(p) > 0 for p in prompts), "empty prompt"
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out.extend(_sample_chunk(model, chunk, params, eos_id, pad_id, vocab_size, generator))
    return out


def _sample_chunk(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> list[Generation]:
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    # Left padding keeps every sequence's next token at the last column.
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attn[i, P - len(p) :] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    cache = DynamicCache()
    # The prefill's head runs on the last position only; the full (B, P, V) logits were
    # P x 151,936 floats per prompt at real vocabulary size, all but one unused. The position is
    # an index tensor, not `logits_to_keep=1`: a slice leaves the (B, 1, H) hidden state strided,
    # and with a frozen head (LoRA) torch's matmul then broadcasts the weight per sequence as a
    # batched product instead of one mm: 16.6 s instead of 1.0 s for 16 prompts at Qwen3-0.6B.
    last = torch.tensor([P - 1], device=device)
    logits = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=positions,
        past_key_values=cache,
        logits_to_keep=last,
    ).logits[:, -1, :vocab_size]  # (B, V): padded head rows are never sampled
    tokens = torch.empty((B, params.max_tokens), dtype=torch.long, device=device)
    seen = torch.zeros((B, vocab_size), dtype=torch.bool, device=device)  # for presence penalty
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), params.max_tokens, dtype=torch.long, device=device)
    pos = positions[:, -1:]
    n = 0
    for n in range(params.max_tokens):
        if params.presence_penalty:
            logits = logits - params.presence_penalty * seen.float()
        if params.temperature == 0.0:
            nxt = logits.argmax(-1)  # (B,)
        else:
            nxt = draw(filter_logits(logits, params).softmax(-1), generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, n] = nxt
        seen[torch.arange(B, device=device), nxt.clamp(max=vocab_size - 1)] |= ~done
        finished_now = (nxt == eos_id) & ~done
        lengths = torch.where(finished_now, torch.full_like(lengths, n + 1), lengths)
        done |= finished_now
        if bool(done.all()) or n == params.max_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        pos = pos + 1
        logits = model(
            input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache
        ).logits[:, -1, :vocab_size]
    tokens_np = tokens[:, : n + 1].cpu().numpy().astype(np.int32)
    gens = []
    for i in range(B):
        L = int(lengths[i])
        row = tokens_np[i, :L]
        stopped = L > 0 and int(row[-1]) == eos_id
        gens.append(Generation(token_ids=row.copy(), finish_reason="stop" if stopped else "length"))
    return gens


class HFSampler:
    """Samples from the training model itself, so it always sees the current weights."""

    def __init__(
        self, model: PreTrainedModel, *, eos_id: int, pad_id: int, vocab_size: int
    ) -> None:
        self.model = model
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        was_training = self.model.training
        self.model.eval()
        # Training left its freed blocks in the heap, and sampling's growing KV cache fits in
        # none of them: give them back first, and sampling's own afterwards (students/memory.py).
        release_free_memory()
        try:
            return sample(
                self.model,
                prompts,
                params,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                vocab_size=self.vocab_size,
            )
        finally:
            self.model.train(was_training)
            release_free_memory()

    def sync(self, model: PreTrainedModel) -> SyncStats | None:
        """Nothing to copy: this sampler runs the training model's own parameters."""
        assert model is self.model, "HFSampler samples the model it was built with"
        return None


@runtime_checkable
class Sampler(Protocol):
    """The student's sampler for on-policy distillation: `HFSampler` or `VLLMSampler`."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        """One completion per prompt from the weights of the last `sync`."""
        ...

    def sync(self, model: PreTrainedModel) -> SyncStats | None:
        """Make the sampler draw from `model`'s current weights; what moved (None: nothing)."""
        ...
