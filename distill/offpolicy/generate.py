"""Teacher data: the teacher answers every prompt in thinking and/or non-thinking mode.

Output: parquet shards under RUN_DIR/teacher_data, one row per response, readable with
`datasets.load_dataset("parquet", data_dir=RUN_DIR/"teacher_data")`. Work is cut into shards of
a fixed list of keys (prompt id, mode, sample index); a shard is written whole to a temporary
file and renamed, and is generated from a seed derived from its index. A run killed at any moment
and rerun therefore ends with exactly the rows of an uninterrupted run: finished shards are
skipped, an unfinished one is regenerated identically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.offpolicy.filters import VERDICTS, verdict
from distill.prompts import Prompt
from distill.rundir import atomic_write_bytes
from teachers.chat import BUDGET_SENTENCE, MODES, Mode, generate_with_budget, render_prompt
from teachers.protocol import (
    NON_THINKING_SAMPLING,
    THINKING_SAMPLING,
    Generation,
    SamplingParams,
    Teacher,
)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    output: str = "teacher_data"  # sub-folder of run_dir for the shards
    modes: tuple[Mode, ...] = MODES
    samples_per_prompt: int = 1
    max_tokens: int = 512
    thinking_budget: int | None = None  # thinking tokens before the stop sentence is inserted
    budget_sentence: str = BUDGET_SENTENCE
    store_topk: int = 0  # > 0: also store the teacher's top-k log-probs of its own responses
    max_prompt_tokens: int = 1024
    overlong: str = "drop"  # "drop" or "truncate" prompts longer than max_prompt_tokens
    shard_size: int = 64
    repetition_threshold: float = 0.5
    seed: int = 0
    # Paper presets by mode; temperature 0 in both gives greedy data.
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING


@dataclass(frozen=True, kw_only=True)
class Summary:
    rows: int
    kept: int
    by_verdict: dict[str, dict[str, int]]  # mode -> verdict -> count
    shards_written: int
    shards_skipped: int
    dropped_prompts: int


def _keys(prompts: Sequence[Prompt], config: Config) -> list[tuple[int, Mode, int]]:
    """The fixed, ordered work list: (prompt index, mode, sample index)."""
    return [
        (i, mode, s)
        for i in range(len(prompts))
        for mode in config.modes
        for s in range(config.samples_per_prompt)
    ]


def generate(
    config: Config,
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    ledger: GpuLedger,
    progress: ProgressFn | None = None,
) -> Summary:
    """Write every missing shard of teacher responses; return counts by mode and verdict."""
    if not prompts:
        raise DistillError("the prompt set is empty: pass a --prompts file with at least one row")
    rendered = {
        mode: [render_prompt(tokenizer, p.messages, mode) for p in prompts] for mode in config.modes
    }
    too_long = {
        i
        for ids in rendered.values()
        for i, x in enumerate(ids)
        if len(x) > config.max_prompt_tokens
    }
    if too_long and config.overlong == "truncate":
        # Keep the end: the generation prompt and the question's last words must survive.
        rendered = {m: [x[-config.max_prompt_tokens :] for x in ids] for m, ids in rendered.items()}
        too_long = set()
    keys = [k for k in _keys(prompts, config) if k[0] not in too_long]
    if not keys:
        raise DistillError(
            f"all {len(prompts)} prompts are longer than --max-prompt-tokens "
            f"{config.max_prompt_tokens}: raise it or pass --overlong truncate"
        )
    out = config.run_dir / config.output
    out.mkdir(parents=True, exist_ok=True)
    shards = [keys[i : i + config.shard_size] for i in range(0, len(keys), config.shard_size)]
    written = skipped = 0
    for index, shard in enumerate(shards):
        path = out / f"shard-{index:05d}.parquet"
        if path.exists():
            skipped += 1
        else:
            rows = _generate_shard(
                config, teacher, tokenizer, prompts, rendered, shard, index, ledger
            )
            table = pa.Table.from_pylist(rows)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
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
        dropped_prompts=len(too_long),
    )


def _generate_shard(
    config: Config,
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    rendered: dict[Mode, list[list[int]]],
    shard: Sequence[tuple[int, Mode, int]],
    index: int,
    ledger: GpuLedger,
) -> list[dict[str, object]]:
    think_end = tokenizer.convert_tokens_to_ids("</think>")
    rows: dict[tuple[int, Mode, int], dict[str, object]] = {}
    for mode in config.modes:
        keys = [k for k in shard if k[1] == mode]
        if not keys:
            continue
        base = config.think_sampling if mode == "think" else config.no_think_sampling
        # Seeded by shard and mode: regenerating a shard after a kill gives the same tokens.
        params = replace(
            base,
            max_tokens=config.max_tokens,
            seed=config.seed * 1_000_003 + index * 7 + (mode == "think"),
        )
        prompt_ids = [rendered[mode][i] for i, _, _ in keys]
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
            meter.add(sum(len(p) + len(g.token_ids) for p, g in zip(prompt_ids, gens, strict=True)))
        topk = None
        if config.store_topk > 0:
            with ledger.phase("teacher.score") as meter:
                topk = teacher.score(
                    [p + g.token_ids.tolist() for p, g in zip(prompt_ids, gens, strict=True)],
                    [len(p) for p in prompt_ids],
                    config.store_topk,
                )
                meter.add(
                    sum(len(p) + len(g.token_ids) for p, g in zip(prompt_ids, gens, strict=True))
                )
        for j, (key, ids, gen) in enumerate(zip(keys, prompt_ids, gens, strict=True)):
            rows[key] = _row(config, teacher, tokenizer, prompts[key[0]], key, ids, gen, think_end)
            if topk is not None:
                rows[key]["topk_ids"] = topk[j].ids.tolist()
                rows[key]["topk_logprobs"] = topk[j].logprobs.tolist()
    return [rows[k] for k in shard]


def _row(
    config: Config,
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    key: tuple[int, Mode, int],
    prompt_ids: list[int],
    gen: Generation,
    think_end: int,
) -> dict[str, object]:
    _, mode, sample = key
    response = gen.token_ids.tolist()
    # With the hard switch the template closed the think block in the prompt: all is answer.
    closed_in_prompt = think_end in prompt_ids[-8:]
    cut = 0 if closed_in_prompt or think_end not in response else response.index(think_end) + 1
    answer_text = tokenizer.decode(
        response[cut:] if cut or closed_in_prompt else [], skip_special_tokens=True
    )
    v, correct = verdict(
        response_ids=response,
        answer_text=answer_text,
        finish_reason=gen.finish_reason,
        reference=prompt.answer,
        repetition_threshold=config.repetition_threshold,
    )
    return {
        "key": f"{prompt.id}|{mode}|{sample}",
        "prompt_id": prompt.id,
        "mode": mode,
        "sample": sample,
        "messages": json.dumps(list(prompt.messages)),
        "prompt_ids": prompt_ids,
        "response_ids": response,
        "response_text": tokenizer.decode(response, skip_special_tokens=False),
        "thinking_tokens": max(cut - 1, 0) if not closed_in_prompt else 0,
        "finish_reason": gen.finish_reason,
        "forced": np.asarray(gen.forced, dtype=bool).tolist(),
        "answer": prompt.answer,
        "correct": correct,
        "verdict": v,
        "teacher": teacher.name,
    }


def count_verdicts(directory: Path) -> dict[str, dict[str, int]]:
    """mode -> verdict -> count over every finished shard."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(directory.glob("shard-*.parquet")):
        table = pq.read_table(path, columns=["mode", "verdict"])
        for mode, v in zip(table["mode"].to_pylist(), table["verdict"].to_pylist(), strict=True):
            counts.setdefault(mode, dict.fromkeys(VERDICTS, 0))[v] += 1
    return counts


def read_rows(directory: Path, columns: Sequence[str] | None = None) -> list[dict[str, object]]:
    """All rows of all finished shards, in key order."""
    paths = sorted(directory.glob("shard-*.parquet"))
    if not paths:
        raise DistillError(f"no teacher data in {directory}: run `distill generate` first")
    rows: list[dict[str, object]] = []
    for path in paths:
        rows.extend(pq.read_table(path, columns=list(columns) if columns else None).to_pylist())
    return rows
