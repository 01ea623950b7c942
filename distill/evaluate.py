"""Held-out measurements taken before and after each stage.

- `heldout_kl`: KL(teacher‖student) per token on held-out *teacher* responses (top-k + tail
  support, scored once by the teacher). Off-policy distillation optimises this one.
- `onpolicy_divergence`: reverse KL(student‖teacher) per token on *fresh student samples* from
  held-out prompts, scored by the teacher. On-policy distillation optimises this one.
- `accuracy`: share of held-out prompts answered correctly, per mode (greedy decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.accounting import GpuLedger, forward_flops
from distill.batch import Example, collate
from distill.objective import topk_divergence
from distill.offpolicy.filters import verify
from distill.prompts import Prompt
from losses import Divergence
from students.sample import sample
from teachers.chat import Mode, render_prompt
from teachers.protocol import SamplingParams, Teacher


@dataclass(frozen=True, kw_only=True)
class Config:
    prompts: int = 32
    top_k: int = 16
    max_tokens: int = 256
    seed: int = 1234


@torch.no_grad()
def mean_divergence(
    model: PreTrainedModel,
    examples: Sequence[Example],
    kind: Divergence,
    vocab_size: int,
    pad_id: int,
    batch_size: int = 16,
) -> float:
    """Token-mean divergence of `model` to the teacher top-k stored in `examples`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id).to(device)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits  # (B, T, V)
        per_token, mask = topk_divergence(logits, batch, kind, vocab_size)  # (B, T-1)
        total += float(per_token.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def heldout_kl(
    model: PreTrainedModel, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase
) -> float:
    return mean_divergence(
        model, examples, "forward_kl", len(tokenizer), int(tokenizer.pad_token_id)
    )


def onpolicy_divergence(
    model: PreTrainedModel,
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    modes: Sequence[Mode],
    config: Config,
    ledger: GpuLedger,
) -> float:
    """Reverse KL on fresh student samples (T=1: its own distribution), scored by the teacher."""
    prompt_ids = [render_prompt(tokenizer, p.messages, mode) for p in prompts for mode in modes]
    params = SamplingParams(temperature=1.0, max_tokens=config.max_tokens, seed=config.seed)
    model.eval()
    with ledger.phase("eval") as meter:
        gens = sample(
            model,
            prompt_ids,
            params,
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(tokenizer.pad_token_id),
            vocab_size=len(tokenizer),
        )
        seqs = [p + g.token_ids.tolist() for p, g in zip(prompt_ids, gens, strict=True)]
        scores = teacher.score(seqs, [len(p) for p in prompt_ids], config.top_k)
        examples = [
            Example(prompt_ids=p, response_ids=g.token_ids.tolist(), train=~g.forced, topk=s)
            for p, g, s in zip(prompt_ids, gens, scores, strict=True)
        ]
        value = mean_divergence(
            model, examples, "reverse_kl", len(tokenizer), int(tokenizer.pad_token_id)
        )
        meter.add(sum(len(s) for s in seqs))
    return value


@torch.no_grad()
def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    mode: Mode,
    config: Config,
    ledger: GpuLedger,
) -> float:
    """Greedy pass@1 on prompts with a reference answer."""
    scored = [p for p in prompts if p.answer is not None]
    if not scored:
        return float("nan")
    ids = [render_prompt(tokenizer, p.messages, mode) for p in scored]
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    with ledger.phase("eval") as meter:
        gens = sample(
            model,
            ids,
            SamplingParams(temperature=0.0, max_tokens=config.max_tokens),
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(tokenizer.pad_token_id),
            vocab_size=len(tokenizer),
        )
        n = sum(len(g.token_ids) for g in gens)
        meter.add(n, forward_flops(n_params, n))
    texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
    right = [
        verify(t, p.answer) for t, p in zip(texts, scored, strict=True) if p.answer is not None
    ]
    return float(np.mean(right))
