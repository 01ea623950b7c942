"""Held-out measurements taken before and after each stage.

- `heldout_kl`: KL(teacher‖student) per token on held-out *teacher* responses (top-k + tail
  support, scored once by the teacher). Off-policy distillation optimises this one.
- `onpolicy_divergence`: reverse KL(student‖teacher) per token on *fresh student samples* from
  held-out prompts, scored by the teacher. On-policy distillation optimises this one.
- `accuracy`: share of held-out prompts answered correctly, per mode (greedy decoding).
- `pass_at`: pass@1 (mean over n samples) and pass@k (the unbiased estimator) per mode, sampled
  with the paper's presets through any sampler's `generate` (transformers or vLLM), and
  `budget_curve`: thinking-mode pass@1 against the thinking budget (the report's Figure 2).
  `distill eval` writes both to RUN_DIR/eval/<name>.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.accounting import GpuLedger, forward_flops
from distill.answers import judge
from distill.batch import Example, collate
from distill.errors import DistillError
from distill.logits_loss import topk_divergence
from distill.prompts import EMBEDDED, Prompt, embedded_prompts, load_prompts
from distill.rundir import atomic_write_json, config_dict, read_json
from distill.tasks import verify
from distill.validation import AT_LEAST_1, Flag, check_fields
from losses import Divergence, DivergenceSpec
from students.sample import (
    NON_THINKING_SAMPLING,
    THINKING_SAMPLING,
    Generation,
    SamplingParams,
    sample,
)
from teachers.chat import BUDGET_SENTENCE, MODES, GenerateFn, Mode, render_prompt, think_end_token
from teachers.chat import generate_with_budget as budgeted
from teachers.protocol import Teacher


def token_id(tokenizer: PreTrainedTokenizerBase, attr: str) -> int:
    """`tokenizer.<attr>` (eos_token_id, pad_token_id), which must be set."""
    value = getattr(tokenizer, attr)
    if not isinstance(value, int):
        raise DistillError(f"the tokenizer has no {attr}: save the model with a Qwen3 tokenizer")
    return value


def decode(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> str:
    """Completion text for verification; <think> tags survive (they are not special tokens)."""
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert isinstance(text, str)
    return text


@dataclass(frozen=True, kw_only=True)
class Config:
    prompts: Annotated[int, AT_LEAST_1] = 32
    top_k: Annotated[int, AT_LEAST_1] = 16
    max_tokens: Annotated[int, AT_LEAST_1] = 256
    seed: int = 1234
    soft_switch: bool = False  # /think, /no_think in the user turn (the model writes the block)

    def __post_init__(self) -> None:
        check_fields(self)


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
        per_token, mask = topk_divergence(
            logits, batch, DivergenceSpec(kind), vocab_size
        )  # (B, T-1)
        total += float(per_token.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def heldout_kl(
    model: PreTrainedModel, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase
) -> float:
    return mean_divergence(
        model, examples, "forward_kl", len(tokenizer), token_id(tokenizer, "pad_token_id")
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
    prompt_ids = [
        render_prompt(tokenizer, p.messages, mode, config.soft_switch)
        for p in prompts
        for mode in modes
    ]
    params = SamplingParams(temperature=1.0, max_tokens=config.max_tokens, seed=config.seed)
    model.eval()
    with ledger.phase("eval") as meter:
        gens = sample(
            model,
            prompt_ids,
            params,
            eos_id=token_id(tokenizer, "eos_token_id"),
            pad_id=token_id(tokenizer, "pad_token_id"),
            vocab_size=len(tokenizer),
        )
        seqs = [p + g.token_ids.tolist() for p, g in zip(prompt_ids, gens, strict=True)]
        scores = teacher.score(seqs, [len(p) for p in prompt_ids], config.top_k)
        examples = [
            Example(prompt_ids=p, response_ids=g.token_ids.tolist(), train=~g.forced, topk=s)
            for p, g, s in zip(prompt_ids, gens, scores, strict=True)
        ]
        value = mean_divergence(
            model, examples, "reverse_kl", len(tokenizer), token_id(tokenizer, "pad_token_id")
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
    ids = [render_prompt(tokenizer, p.messages, mode, config.soft_switch) for p in scored]
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    with ledger.phase("eval") as meter:
        gens = sample(
            model,
            ids,
            SamplingParams(temperature=0.0, max_tokens=config.max_tokens),
            eos_id=token_id(tokenizer, "eos_token_id"),
            pad_id=token_id(tokenizer, "pad_token_id"),
            vocab_size=len(tokenizer),
        )
        n = sum(len(g.token_ids) for g in gens)
        meter.add(n, forward_flops(n_params, n))
    texts = [decode(tokenizer, g.token_ids) for g in gens]
    right = [
        verify(t, p.answer) for t, p in zip(texts, scored, strict=True) if p.answer is not None
    ]
    return float(np.mean(right))


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Sampled evaluation: `n` samples per prompt and mode, pass@k for each k in `ks`."""

    n: Annotated[int, AT_LEAST_1] = 8
    ks: tuple[int, ...] = (1, 4, 8)
    modes: tuple[Mode, ...] = MODES
    max_tokens: Annotated[int, AT_LEAST_1] = 96
    # thinking budgets of the curve (thinking mode)
    budgets: Annotated[tuple[int, ...], AT_LEAST_1, Flag("--thinking-budget")] = ()
    budget_sentence: str = BUDGET_SENTENCE
    think_sampling: SamplingParams = THINKING_SAMPLING  # the paper's presets per mode
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING
    seed: int = 0
    soft_switch: bool = False  # /think, /no_think in the user turn (the model writes the block)

    def __post_init__(self) -> None:
        check_fields(self)  # n >= 1, every budget >= 1, the modes: from the field types above
        bad = [k for k in self.ks if not 1 <= k <= self.n]
        if bad:
            raise DistillError(
                f"--k {bad} out of range: pass@k needs 1 <= k <= n = {self.n}; raise --n or "
                "lower --k"
            )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021).

    1 − C(n−c, k)/C(n, k): the chance that k of the n samples, drawn without replacement,
    include a correct one. Computed as 1 − Π_{i=n−c+1..n} (1 − k/i), never forming the binomials.
    """
    assert 0 <= c <= n and 1 <= k <= n, (n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True, kw_only=True)
class Samples:
    """Verified samples: row i is prompt i, column j its j-th sample."""

    correct: np.ndarray  # (P, n) bool
    tokens: np.ndarray  # (P, n) int, completion length
    thinking: np.ndarray  # (P, n) int, tokens through </think> (0 in non-thinking mode)
    truncated: np.ndarray  # (P, n) bool, cut at max_tokens


def sample_and_verify(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    mode: Mode,
    params: SamplingParams,
    n: int,
    ledger: GpuLedger,
    *,
    n_params: int = 0,
    budget: int | None = None,
    sentence: str = BUDGET_SENTENCE,
    soft_switch: bool = False,
    audit: list[dict[str, object]] | None = None,
) -> Samples:
    """`n` completions per prompt in `mode`, each checked against the prompt's answer."""
    ids = [render_prompt(tokenizer, p.messages, mode, soft_switch) for p in prompts]
    think_end = think_end_token(tokenizer)  # None on templates without think tokens
    if budget is not None and think_end is None:
        raise DistillError("--thinking-budget needs a '</think>' token: drop --thinking-budget")
    sentence_ids = tokenizer.encode(sentence, add_special_tokens=False)
    if budget is not None and think_end not in sentence_ids:
        raise DistillError("the budget sentence must end the think block: it needs '</think>'")
    shape = (len(prompts), n)
    correct, truncated = np.zeros(shape, bool), np.zeros(shape, bool)
    tokens, thinking = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for j in range(n):
        # One call per sample index with its own seed: the j-th samples stay independent whatever
        # a backend does with one request's seed. Stride 2: a budget's phase 2 uses seed + 1.
        pj = replace(params, seed=params.seed + 2 * j)
        with ledger.phase("eval") as meter:
            gens: list[Generation] = (
                generate(ids, pj)
                if budget is None
                else budgeted(
                    generate, ids, pj, budget=budget, think_end_id=think_end or 0,
                    sentence_ids=sentence_ids,
                )
            )  # fmt: skip
            n_new = sum(len(g.token_ids) for g in gens)
            meter.add(n_new, forward_flops(n_params, n_new))
        for i, (g, p) in enumerate(zip(gens, prompts, strict=True)):
            assert p.answer is not None, "eval_prompts keeps only prompts with an answer"
            text = decode(tokenizer, g.token_ids)
            judged = judge(text, p.answer)  # the fallback order of distill.answers
            correct[i, j] = judged.correct
            tokens[i, j] = len(g.token_ids)
            ended = g.token_ids.tolist().index(think_end) + 1 if think_end in g.token_ids else None
            thinking[i, j] = 0 if mode != "think" else (ended or len(g.token_ids))
            truncated[i, j] = g.finish_reason == "length"
            if audit is not None:
                audit.append(
                    {
                        "prompt_index": i, "prompt": p.messages[-1]["content"],
                        "reference": p.answer, "mode": mode, "budget": budget, "sample": j,
                        "response": text, "answer": judged.answer, "rule": judged.rule,
                        "correct": judged.correct, "tokens": len(g.token_ids),
                        "truncated": bool(truncated[i, j]),
                    }
                )  # fmt: skip
    return Samples(correct=correct, tokens=tokens, thinking=thinking, truncated=truncated)


def summarize(samples: Samples, ks: Sequence[int]) -> dict[str, Any]:
    """pass@1 (mean over all samples), pass@k (mean over prompts), lengths, per-prompt counts."""
    n = samples.correct.shape[1]
    counts = samples.correct.sum(axis=1)  # (P,)
    out: dict[str, Any] = {"pass@1": float(samples.correct.mean())}
    for k in sorted(set(ks) - {1}):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    out["mean_tokens"] = float(samples.tokens.mean())
    out["mean_thinking_tokens"] = float(samples.thinking.mean())
    out["truncated"] = float(samples.truncated.mean())
    out["correct_counts"] = counts.tolist()
    return out


def pass_at(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    config: PassConfig,
    ledger: GpuLedger,
    n_params: int = 0,
    audit: list[dict[str, object]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per mode: pass@1 and pass@k over `config.n` samples with that mode's sampling preset."""
    out: dict[str, dict[str, Any]] = {}
    for mode in config.modes:
        preset = config.think_sampling if mode == "think" else config.no_think_sampling
        params = replace(preset, max_tokens=config.max_tokens, seed=config.seed)
        samples = sample_and_verify(
            generate, tokenizer, prompts, mode, params, config.n, ledger, n_params=n_params,
            soft_switch=config.soft_switch, audit=audit,
        )  # fmt: skip
        out[mode] = summarize(samples, config.ks)
    return out


def budget_curve(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    config: PassConfig,
    ledger: GpuLedger,
    n_params: int = 0,
    audit: list[dict[str, object]] | None = None,
) -> list[dict[str, Any]]:
    """Thinking-mode pass@k at each budget; the same seeds at every budget (common randomness)."""
    params = replace(config.think_sampling, max_tokens=config.max_tokens, seed=config.seed)
    rows = []
    for budget in sorted(config.budgets):
        samples = sample_and_verify(
            generate, tokenizer, prompts, "think", params, config.n, ledger,
            n_params=n_params, budget=budget, sentence=config.budget_sentence,
            soft_switch=config.soft_switch, audit=audit,
        )  # fmt: skip
        rows.append({"budget": budget, **summarize(samples, config.ks)})
    return rows


def reference_answer(answer: str) -> str:
    """The checkable part of a reference: GSM8K's solutions end in '#### 1,234' -> '1234'."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


def eval_prompts(
    source: str, n: int, seed: int, prompt_column: str = "prompt", answer_column: str = "answer"
) -> list[Prompt]:
    """Up to `n` prompts with reference answers: the embedded task's held-out split, or a file."""
    if source == EMBEDDED:
        return embedded_prompts(n, seed, "eval")
    rows = load_prompts(source, prompt_column=prompt_column, answer_column=answer_column)
    answered = [
        replace(p, answer=reference_answer(p.answer))
        for p in rows
        if p.answer is not None and p.answer.strip()
    ]
    if not answered:
        raise DistillError(
            f"{source} has no answers in column {answer_column!r}: a verifying eval needs a "
            "reference answer per prompt; pass --answer-column NAME"
        )
    return answered[:n]


def result_path(run_dir: Path, name: str) -> Path:
    return run_dir / "eval" / f"{name}.json"


def stored_result(
    run_dir: Path, name: str, header: dict[str, Any], force: bool
) -> dict[str, Any] | None:
    """A finished result with the same `header` (model, prompts, config), to reuse, or None.

    A result under `name` from another header is refused unless `force`: silently replacing it
    would lose a measurement that may have cost hours of sampling.
    """
    path = result_path(run_dir, name)
    if force or not path.exists():
        return None
    old = read_json(path)
    old_header = {k: old.get(k) for k in header}
    if old_header == json_safe(header):
        return old
    changed = sorted(k for k in header if old_header[k] != json_safe(header)[k])
    raise DistillError(
        f"{path} holds an evaluation with another {', '.join(changed)}: pass --name NEW to keep "
        "both, or --force to replace it"
    )


def json_safe(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: config_dict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in obj.items()}


def save_result(run_dir: Path, name: str, header: dict[str, Any], measured: dict[str, Any]) -> Path:
    path = result_path(run_dir, name)
    atomic_write_json(path, {**json_safe(header), **measured})
    return path
