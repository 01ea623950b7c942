"""Prompt sets: the embedded arithmetic task, or any `datasets`-readable file of prompts."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.tasks import problems

EMBEDDED = "embedded"  # the prompt source name of the built-in arithmetic task


@dataclass(frozen=True, kw_only=True)
class Prompt:
    id: str
    messages: tuple[dict[str, str], ...]  # the conversation; the last one is the user's
    answer: str | None  # verifiable reference answer, when the source has one


def embedded_prompts(n: int, seed: int, split: str) -> list[Prompt]:
    return [
        Prompt(id=p.id, messages=({"role": "user", "content": p.prompt},), answer=str(p.answer))
        for p in problems(n, seed, split)
    ]


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix in (".parquet", ".arrow", ".csv"):
        return suffix[1:]
    raise DistillError(
        f"cannot tell the format of {path}: use a .jsonl, .json, .parquet, .arrow or .csv file"
    )


def load_prompts(
    source: str,
    *,
    prompt_column: str = "prompt",
    answer_column: str | None = "answer",
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from a local file (jsonl/json/parquet/arrow/csv) or a hub dataset name.

    A prompt cell may be a string (one user message) or a list of {role, content} messages.
    """
    import datasets  # heavy; only the file path needs it

    path = Path(source)
    # datasets logs a parser's failure before raising it: the one error line below says it.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        if path.exists():
            ds = datasets.load_dataset(_format(path), data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except DistillError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        e = e.__cause__ or e  # DatasetGenerationError wraps the parser's error, which says where
        # One line: a worker's error may carry its whole traceback, whose last line is the error.
        detail = ([line.strip() for line in str(e).splitlines() if line.strip()] or [""])[-1]
        raise DistillError(
            f"cannot read prompts from {source}: {type(e).__name__}: {detail[:200]}; "
            "pass a readable .jsonl/.parquet file (one prompt per row)"
        ) from None
    finally:
        logger.setLevel(level)
    columns = list(ds.column_names)
    if prompt_column not in columns:
        raise DistillError(
            f"prompt column {prompt_column!r} not found in {source}; columns are {columns}: "
            "pass --prompt-column NAME"
        )
    has_answer = answer_column is not None and answer_column in columns
    out: list[Prompt] = []
    for i, row in enumerate(_rows(ds, source)):
        messages = _messages(row[prompt_column], source, i)
        if messages is None:
            continue  # empty prompts are skipped; the caller reports how many remain
        answer = row[answer_column] if has_answer and answer_column is not None else None
        out.append(
            Prompt(
                id=str(row.get("id", i)),
                messages=messages,
                answer=None if answer is None else str(answer),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DistillError(f"no non-empty prompts in {source}: check the file and --prompt-column")
    return out


def _rows(ds: Iterable[object], source: str) -> Iterator[dict[str, object]]:
    """The rows as dicts; text that is not UTF-8 fails only when read, so name its row."""
    it = iter(ds)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise DistillError(
                f"{source} is not UTF-8 text at or after row {i} (bytes "
                f"{e.object[e.start : e.end]!r}): re-encode it as UTF-8, e.g. `iconv -f latin1 "
                "-t utf-8`"
            ) from None
        assert isinstance(row, dict)
        yield row
        i += 1


def _messages(cell: object, source: str, row: int) -> tuple[dict[str, str], ...] | None:
    if isinstance(cell, str):
        return ({"role": "user", "content": cell},) if cell.strip() else None
    if isinstance(cell, Sequence) and all(
        isinstance(m, dict) and {"role", "content"} <= set(m) for m in cell
    ):
        msgs = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in cell)
        return msgs if msgs and any(m["role"] == "user" for m in msgs) else None
    raise DistillError(
        f"row {row} of {source}: a prompt must be a string or a list of {{role, content}} "
        f"messages, got {json.dumps(cell, default=str)[:80]}"
    )
