"""Answer extraction for `distill eval`, in a documented fallback order, with the rule recorded.

Models that were not asked to box their answer still state one. The first rule that finds an
answer in the answer part (after `</think>`) decides, and the verdict compares it with the
reference:
1. `boxed`: the last `\\boxed{...}`;
2. `hash`: the last `#### N` (GSM8K's solution format);
3. `last_number`: the last number in the text (numeric references only);
4. `math_verify`: math-verify parses the whole answer part against the reference;
5. `none`: nothing was found (wrong).
Every judged response is kept (`write_responses`) so extraction can be audited.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

Rule = Literal["boxed", "hash", "last_number", "math_verify", "none"]
RULES: tuple[Rule, ...] = ("boxed", "hash", "last_number", "math_verify", "none")

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASH = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True, kw_only=True)
class Judgement:
    answer: str | None  # what the deciding rule extracted
    rule: Rule
    correct: bool


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def _same(got: str, reference: str) -> bool:
    """Numbers by value (1,000 = 1000.0), anything else by math-verify."""
    a, b = _number(got), _number(reference)
    if a is not None and b is not None:
        return a == b
    from math_verify import parse, verify

    gold, pred = parse(f"${reference}$"), parse(f"${got}$")
    return bool(gold and pred and verify(gold, pred))


def judge(text: str, reference: str) -> Judgement:
    """The answer `text` gives, the rule that found it, and whether it matches `reference`."""
    part = text.split("</think>")[-1]
    patterns: tuple[tuple[Rule, re.Pattern[str]], ...] = (("boxed", _BOXED), ("hash", _HASH))
    for rule, pattern in patterns:
        found = pattern.findall(part)
        if found:
            return Judgement(answer=found[-1], rule=rule, correct=_same(found[-1], reference))
    if _number(reference) is not None:
        numbers = _NUMBER.findall(part)
        if numbers:
            got = numbers[-1]
            return Judgement(answer=got, rule="last_number", correct=_same(got, reference))
    from math_verify import parse, verify

    gold, pred = parse(f"${reference}$"), parse(part)
    if pred:
        correct = bool(gold and verify(gold, pred))
        return Judgement(answer=str(pred[-1]), rule="math_verify", correct=correct)
    return Judgement(answer=None, rule="none", correct=False)


SCHEMA = pa.schema(
    [
        ("prompt_index", pa.int32()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("mode", pa.string()),
        ("budget", pa.int32()),  # thinking budget of a curve point, null for pass@k
        ("sample", pa.int32()),
        ("response", pa.string()),
        ("answer", pa.string()),  # what the deciding rule extracted (null: nothing)
        ("rule", pa.string()),  # boxed, hash, last_number, math_verify or none
        ("correct", pa.bool_()),
        ("tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


def write_responses(path: Path, records: Sequence[dict[str, object]]) -> Path:
    """Every judged response as one parquet row (atomically, beside the result's json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(list(records), schema=SCHEMA), tmp)
    tmp.replace(path)
    return path
