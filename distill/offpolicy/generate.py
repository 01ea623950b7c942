"""Teacher data: the teacher answers every prompt in thinking and/or non-thinking mode.

Output: parquet shards under RUN_DIR/teacher_data, one row per response (`dataset.SCHEMA`),
readable with `datasets.load_dataset("parquet", data_dir=RUN_DIR/"teacher_data")`; a rerun by
another teacher or config is refused unless forced (`dataset.claim`).

Work is cut into shards of a fixed, ordered list of keys (prompt id, mode, sample index); a shard
is written whole to a temporary file and renamed, and is generated from a seed derived from its
index. A run killed at any moment and rerun therefore ends with exactly the rows of an
uninterrupted run: finished shards are skipped, an unfinished one is regenerated identically.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from distill.accounting import GpuLedger, teacher_flops
from distill.errors import DistillError
from distill.offpolicy.filters import repetition_score, verdict
from distill.prompts import Prompt
from distill.rundir import atomic_write_bytes, config_dict
from distill.seeds import derive_seed
from distill.teacher_data import (
    claim,
    count_verdicts,
    read_shard,
    row_key,
    schema,
)
from distill.validation import AT_LEAST_1, FRACTION, check_budget, check_fields
from students.sample import NON_THINKING_SAMPLING, THINKING_SAMPLING, Generation, SamplingParams
from teachers.chat import (
    ALL_MODES,
    BUDGET_SENTENCE,
    MODES,
    Message,
    Mode,
    check_modes,
    generate_with_budget,
    render_prompt,
    think_end_token,
)
from teachers.protocol import Teacher, TopK

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
Key = tuple[int, Mode, int]  # (prompt index, mode, sample index); the row key uses the prompt id


Overlong = Literal["drop", "truncate"]


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    output: str = "teacher_data"  # sub-folder of run_dir for the shards
    modes: tuple[Mode, ...] = MODES  # every prompt in each of these modes
    # instead of both modes: this share of prompts in think mode, the rest not
    think_ratio: Annotated[float, FRACTION] | None = None
    soft_switch: bool = False  # /think, /no_think in the user turn (the model writes the block)
    samples_per_prompt: Annotated[int, AT_LEAST_1] = 1
    max_tokens: Annotated[int, AT_LEAST_1] = 512
    # thinking tokens before the stop sentence is inserted
    thinking_budget: Annotated[int, AT_LEAST_1] | None = None
    budget_sentence: str = BUDGET_SENTENCE
    store_topk: int = 0  # > 0: also store the teacher's top-k log-probs of its own responses
    max_prompt_tokens: Annotated[int, AT_LEAST_1] = 1024
    overlong: Overlong = "drop"  # prompts longer than max_prompt_tokens
    shard_size: Annotated[int, AT_LEAST_1] = 64
    repetition_threshold: Annotated[float, FRACTION] = 0.5
    seed: int = 0
    # Paper presets by mode (docs/facts.md); temperature 0 in both gives greedy data.
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING

    def __post_init__(self) -> None:
        check_config(self)


@dataclass(frozen=True, kw_only=True)
class Summary:
    rows: int
    kept: int
    by_verdict: dict[str, dict[str, int]]  # mode -> verdict -> count
    shards_written: int
    shards_skipped: int
    dropped_prompts: int  # over max_prompt_tokens (or not truncatable) and left out
    truncated_prompts: int = 0  # over max_prompt_tokens and cut to fit


def check_config(config: Config) -> None:
    """Refuse settings that cannot mean anything, naming the flag to change."""
    check_fields(config)  # choices and ranges, from the field types
    if config.think_ratio is not None and tuple(config.modes) != MODES:
        raise DistillError("--think-ratio picks a mode per prompt: leave --modes at both")
    check_budget(config.thinking_budget, config.max_tokens)


def prompt_modes(n: int, config: Config) -> list[tuple[Mode, ...]]:
    """Modes each prompt is answered in: all of `modes`, or one by a seeded split at think_ratio."""
    if config.think_ratio is None:
        return [tuple(config.modes)] * n
    order = list(range(n))
    random.Random(config.seed).shuffle(order)  # exact share, not n coin flips
    thinking = set(order[: round(config.think_ratio * n)])
    return [("think",) if i in thinking else ("no_think",) for i in range(n)]


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    mode: Mode,
    config: Config,
) -> tuple[list[int], tuple[Message, ...]] | None:
    """(prompt ids, messages) within max_prompt_tokens, or None when the prompt must be dropped.

    Truncation cuts the start of the last user message and keeps the template whole: the
    question usually ends the message, and the generation prompt must survive.
    """
    limit = config.max_prompt_tokens
    ids = render_prompt(tokenizer, messages, mode, config.soft_switch)
    if len(ids) <= limit:
        return ids, tuple(messages)
    if config.overlong == "drop":
        return None
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    content = tokenizer.encode(messages[last]["content"], add_special_tokens=False)
    keep = len(content) - (len(ids) - limit)
    while keep > 0:  # re-encoding a cut string can merge differently: shrink until it fits
        cut = [dict(m) for m in messages]
        text = tokenizer.decode(content[-keep:])
        assert isinstance(text, str)
        cut[last]["content"] = text
        ids = render_prompt(tokenizer, cut, mode, config.soft_switch)
        if len(ids) <= limit:
            return ids, tuple(cut)
        keep -= len(ids) - limit
    return None  # the template and the other messages alone exceed the limit


def check_inputs(
    config: Config,
    teacher_name: str,
    max_top_k: int,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
) -> None:
    """What `generate` checks before it writes anything (`distill generate --dry-run` too)."""
    check_config(config)
    if not prompts:
        raise DistillError("the prompt set is empty: pass a --prompts file with at least one row")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise DistillError(
                f"prompt id {p.id!r} occurs twice: row keys must be unique; make the id column "
                "unique or drop it (rows are then numbered)"
            )
        seen.add(p.id)
    if config.store_topk > max_top_k:
        raise DistillError(
            f"--store-topk {config.store_topk} is above what teacher {teacher_name} serves "
            f"({max_top_k}): lower --store-topk, or restart the server with a larger "
            "--max-logprobs"
        )
    check_modes(
        config.modes,
        tokenizer,
        soft_switch=config.soft_switch,
        thinking_budget=config.thinking_budget is not None,
    )


def generate(
    config: Config,
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    ledger: GpuLedger,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> Summary:
    """Write every missing shard of teacher responses; return counts by mode and verdict."""
    check_inputs(config, teacher.name, teacher.max_top_k, tokenizer, prompts)
    out = config.run_dir / config.output
    settings = {k: v for k, v in config_dict(config).items() if k != "run_dir"}
    claim(out, teacher.name, settings, prompts, force)
    for stale in out.glob(".shard-*.tmp"):  # left by a writer killed mid-write; never read
        stale.unlink()

    modes_of = prompt_modes(len(prompts), config)
    fitted: dict[tuple[int, Mode], tuple[list[int], tuple[Message, ...]]] = {}
    dropped: set[int] = set()
    truncated: set[int] = set()
    for i, p in enumerate(prompts):
        for mode in modes_of[i]:
            fit = fit_prompt(tokenizer, p.messages, mode, config)
            if fit is None:
                dropped.add(i)
            else:
                fitted[i, mode] = fit
                if fit[1] != tuple(p.messages):
                    truncated.add(i)
    keys: list[Key] = [
        (i, mode, s)
        for i in range(len(prompts))
        if i not in dropped
        for mode in modes_of[i]
        for s in range(config.samples_per_prompt)
    ]
    if not keys:
        raise DistillError(
            f"all {len(prompts)} prompts are longer than --max-prompt-tokens "
            f"{config.max_prompt_tokens}: raise it, or pass --overlong truncate"
        )
    shards = [keys[i : i + config.shard_size] for i in range(0, len(keys), config.shard_size)]
    written = skipped = 0
    for index, shard in enumerate(shards):
        path = out / f"shard-{index:05d}.parquet"
        expected = [row_key(prompts[i].id, mode, s) for i, mode, s in shard]
        if path.exists():
            found = read_shard(path, ["key"])["key"].to_pylist()
            if found != expected:
                raise DistillError(
                    f"{path} holds other rows than this run would write there (prompts changed?):"
                    " use a new --run-dir, or --force to set the old data aside"
                )
            skipped += 1
        else:
            rows = _generate_shard(
                config, teacher, tokenizer, prompts, fitted, shard, index, ledger
            )
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows, schema=schema(config.store_topk)), sink)
            atomic_write_bytes(path, sink.getvalue().to_pybytes())
            written += 1
        if progress is not None:
            progress("teacher.generate", index + 1, len(shards))
    counts = count_verdicts(out)
    return Summary(
        rows=sum(sum(v.values()) for v in counts.values()),
        kept=sum(v.get("kept", 0) for v in counts.values()),
        by_verdict=counts,
        shards_written=written,
        shards_skipped=skipped,
        dropped_prompts=len(dropped),
        truncated_prompts=len(truncated - dropped),
    )


def _generate_shard(
    config: Config,
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    fitted: dict[tuple[int, Mode], tuple[list[int], tuple[Message, ...]]],
    shard: Sequence[Key],
    index: int,
    ledger: GpuLedger,
) -> list[dict[str, object]]:
    think_end = think_end_token(tokenizer) or -1  # -1: no think tokens, and so no budget
    rows: dict[Key, dict[str, object]] = {}
    for mode in ALL_MODES:
        keys = [k for k in shard if k[1] == mode]
        if not keys:
            continue
        base = config.think_sampling if mode == "think" else config.no_think_sampling
        # Seeded by shard and mode: regenerating a shard after a kill gives the same tokens.
        params = replace(
            base,
            max_tokens=config.max_tokens,
            seed=derive_seed(config.seed, index * 7 + (mode == "think")),
        )
        prompt_ids = [fitted[i, mode][0] for i, _, _ in keys]
        with ledger.phase("teacher.generate") as meter:
            if mode == "think" and config.thinking_budget is not None:
                gens = generate_with_budget(
                    teacher.generate,
                    prompt_ids,
                    params,
                    budget=config.thinking_budget,
                    think_end_id=think_end,
                    sentence_ids=tokenizer.encode(config.budget_sentence, add_special_tokens=False),
                )
            else:
                gens = teacher.generate(prompt_ids, params)
            n_gen = sum(len(p) + len(g.token_ids) for p, g in zip(prompt_ids, gens, strict=True))
            meter.add(n_gen, teacher_flops(teacher, n_gen))
        scores: list[TopK | None] = [None] * len(keys)
        if config.store_topk > 0:
            sequences = [p + g.token_ids.tolist() for p, g in zip(prompt_ids, gens, strict=True)]
            with ledger.phase("teacher.score") as meter:
                scores = list(
                    teacher.score(sequences, [len(p) for p in prompt_ids], config.store_topk)
                )
                n_scored = sum(len(s) for s in sequences)
                meter.add(n_scored, teacher_flops(teacher, n_scored))
        for key, ids, gen, topk in zip(keys, prompt_ids, gens, scores, strict=True):
            prompt = prompts[key[0]]
            messages = fitted[key[0], mode][1]
            rows[key] = _row(config, teacher.name, tokenizer, prompt, messages, key, ids, gen)
            if topk is not None:
                rows[key]["topk_ids"] = topk.ids.tolist()
                rows[key]["topk_logprobs"] = topk.logprobs.tolist()
                rows[key]["topk_actual_logprobs"] = topk.actual_logprobs.tolist()
    return [rows[k] for k in shard]


def _row(
    config: Config,
    teacher: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    messages: tuple[Message, ...],
    key: Key,
    prompt_ids: list[int],
    gen: Generation,
) -> dict[str, object]:
    _, mode, sample = key
    think_end = think_end_token(tokenizer)
    response = gen.token_ids.tolist()
    forced = np.asarray(gen.forced, dtype=bool)
    # With the hard switch the template closed the think block in the prompt: all is answer.
    closed_in_prompt = think_end in prompt_ids[-8:]
    if mode == "plain" or think_end is None or closed_in_prompt:
        thinking = 0  # no think block (plain) or one closed in the prompt: all of it is answer
    elif think_end in response:
        thinking = response.index(think_end) + 1
    else:
        thinking = len(response)  # never closed: all of it is thinking, there is no answer
    answer_text = tokenizer.decode(response[thinking:], skip_special_tokens=True)
    assert isinstance(answer_text, str)
    v, correct = verdict(
        response_ids=response,
        answer_text=answer_text,
        finish_reason=gen.finish_reason,
        reference=prompt.answer,
        repetition_threshold=config.repetition_threshold,
        budget_exhausted=bool(forced.any()),
    )
    return {
        "key": row_key(prompt.id, mode, sample),
        "prompt_id": prompt.id,
        "mode": mode,
        "sample": sample,
        "messages": [dict(m) for m in messages],
        "prompt_ids": prompt_ids,
        "response_ids": response,
        "response_text": tokenizer.decode(response, skip_special_tokens=False),
        "thinking_tokens": thinking,
        "finish_reason": gen.finish_reason,
        "forced": forced.tolist(),
        "answer": prompt.answer,
        "correct": correct,
        "repetition": repetition_score(response),
        "verdict": v,
        "teacher": teacher,
    }


def check_usable(summary: Summary) -> None:
    """Raise when no row survived the filters, naming the filter that removed the most."""
    if summary.kept > 0:
        return
    removed: dict[str, int] = {}
    for counts in summary.by_verdict.values():
        for v, n in counts.items():
            removed[v] = removed.get(v, 0) + n
    worst = max(removed, key=lambda v: removed[v])
    fixes = {
        "truncated": "raise --max-tokens (or --thinking-budget)",
        "empty": "check the teacher's chat template and --max-tokens",
        "repetitive": "raise --repetition-threshold or use a stronger teacher",
        "wrong": "check --answer-column, or use a stronger teacher",
    }
    raise DistillError(
        f"no usable teacher responses: all {summary.rows} were filtered out, most by the "
        f"{worst!r} filter ({', '.join(f'{v}: {n}' for v, n in removed.items() if n)}); "
        f"{fixes.get(worst, 'relax the filters')}. The rows are kept on disk with their verdicts"
    )
