"""Response filters, as the paper's response filtering: wrong, truncated, repetitive, empty.

A response is judged by the first check it fails, in `VERDICTS` order:
- truncated: no eos (cut at --max-tokens), or the thinking budget ran out (the stop sentence was
  forced) and no answer followed it;
- empty: nothing but whitespace after the think block;
- repetitive: more than `repetition_threshold` of its 4-grams repeat an earlier one (a loop);
- wrong: a reference answer exists and the final answer does not match it (integers exactly,
  everything else, e.g. fractions, radicals or expressions in `\\boxed{}`, with math-verify).

Every response is kept in the dataset with a `verdict`; training reads only "kept" rows, so a
filter change never needs the teacher again and nothing generated is thrown away.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from distill.tasks import verify


def repetition_score(token_ids: Sequence[int], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram: 0 for none, near 1 for a loop."""
    if len(token_ids) < 2 * n:
        return 0.0
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def verdict(
    *,
    response_ids: Sequence[int],
    answer_text: str,
    finish_reason: str,
    reference: str | None,
    repetition_threshold: float,
    budget_exhausted: bool = False,
) -> tuple[str, bool | None]:
    """(verdict, correct): the first failed check in VERDICTS order, and the verification result.

    `budget_exhausted`: the stop sentence was forced into the response by the thinking budget.
    """
    correct = verify(answer_text, reference) if reference is not None else None
    if finish_reason != "stop" or (budget_exhausted and not answer_text.strip()):
        return "truncated", correct
    if not answer_text.strip():
        return "empty", correct
    if repetition_score(response_ids) > repetition_threshold:
        return "repetitive", correct
    if correct is False:
        return "wrong", correct
    return "kept", correct
