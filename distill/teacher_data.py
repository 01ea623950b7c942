"""The teacher-data folder: row schema, shard reading, and who wrote it.

RUN_DIR/teacher_data/shard-NNNNN.parquet hold one row per teacher response (`SCHEMA`), readable
with `datasets.load_dataset("parquet", data_dir=RUN_DIR/"teacher_data")`. The hidden
`.dataset.json` beside them (datasets' parquet loader skips dot-files) records the teacher, the
generation settings and the prompt set's fingerprint: `claim` refuses a folder written by another
run unless forced, and forcing sets the old folder aside instead of deleting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill.errors import DistillError
from distill.manifest import fingerprint
from distill.prompts import Prompt
from distill.rundir import atomic_write_json, read_json

# every response is kept with the first filter it failed (distill/offpolicy/filters.py)
VERDICTS = ("kept", "truncated", "empty", "repetitive", "wrong")
META = ".dataset.json"

_ids = pa.list_(pa.int32())
SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # "prompt_id|mode|sample", unique
        ("prompt_id", pa.string()),
        ("mode", pa.string()),  # "think", "no_think", or "plain" (a template without thinking)
        ("sample", pa.int32()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("prompt_ids", _ids),  # the rendered prompt the teacher answered, generation prompt last
        ("response_ids", _ids),  # the completion, eos included when it stopped
        ("response_text", pa.string()),  # decoded with special tokens kept
        ("thinking_tokens", pa.int32()),  # response tokens through `</think>` (0: none)
        ("finish_reason", pa.string()),  # "stop" (eos) or "length"
        ("forced", pa.list_(pa.bool_())),  # response tokens inserted by the budget, not sampled
        ("answer", pa.string()),  # reference answer, null without an answer column
        ("correct", pa.bool_()),  # verification result, null without a reference
        ("repetition", pa.float32()),  # repeated 4-gram share of the response
        ("verdict", pa.string()),  # "kept" or the first filter that removed it (VERDICTS)
        ("teacher", pa.string()),  # the teacher's identity (path and weight hash)
    ]
)
TOPK_FIELDS = [
    pa.field("topk_ids", pa.list_(_ids)),  # (R, K): teacher's top-k at each response token
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # (R, K)
    pa.field("topk_actual_logprobs", pa.list_(pa.float32())),  # (R,) log p_t(response token)
]


def row_key(prompt_id: str, mode: str, sample: int) -> str:
    return f"{prompt_id}|{mode}|{sample}"


def schema(store_topk: int) -> pa.Schema:
    return pa.schema([*SCHEMA, *TOPK_FIELDS]) if store_topk > 0 else SCHEMA


def claim(
    out: Path, teacher: str, settings: dict[str, object], prompts: Sequence[Prompt], force: bool
) -> None:
    """Make `out` this run's: refuse data by another teacher/config/prompt set unless `force`.

    `settings`: the generation config as plain values, without paths that may move. Forcing never
    deletes: the old folder is renamed to `<out>.replaced-N`.
    """
    identity: dict[str, object] = {
        "teacher": teacher,
        "config": settings,
        "prompts": {"count": len(prompts), "fingerprint": fingerprint(prompts)},
    }
    meta = out / META
    if meta.exists() or any(out.glob("shard-*.parquet")):
        old = read_json(meta, default={})
        if old == identity:
            return
        old_settings = old.get("config")
        old_settings = old_settings if isinstance(old_settings, dict) else {}
        changed = sorted(
            [k for k in ("teacher", "prompts") if old.get(k) != identity[k]]
            + [f"config.{k}" for k in settings if old_settings.get(k) != settings[k]]
        )
        if not force:
            raise DistillError(
                f"{out} holds teacher data from another run (differs in: "
                f"{', '.join(changed) or 'unknown origin'}): use a new --run-dir, or --force to "
                "set the old data aside"
            )
        n = 1
        while out.with_name(f"{out.name}.replaced-{n}").exists():
            n += 1
        out.rename(out.with_name(f"{out.name}.replaced-{n}"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta, identity)


def count_verdicts(directory: Path) -> dict[str, dict[str, int]]:
    """mode -> verdict -> count over every finished shard."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(directory.glob("shard-*.parquet")):
        table = read_shard(path, ["mode", "verdict"])
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
        rows.extend(read_shard(path, columns).to_pylist())
    return rows


def read_shard(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One shard, or a DistillError naming it when it is damaged (truncated, not parquet).

    Shards are only ever renamed into place whole, so a damaged one came from outside (a partial
    copy, a full disk under another writer): regenerating it is the fix, and only it is lost.
    """
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError) as e:
        raise DistillError(
            f"teacher-data shard {path} is damaged ({type(e).__name__}: {str(e)[:120]}): delete "
            "that file and rerun the same `distill generate` command to regenerate it"
        ) from None
