"""distill.answers: the extraction fallback order and the rule that decided, and the audit file
`distill eval` writes beside its json."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from distill.answers import judge
from tests.conftest import TinyPair


@pytest.mark.parametrize(
    ("text", "reference", "answer", "rule", "correct"),
    [
        ("<think>\n12\n</think>\n\nSo \\boxed{42}.", "42", "42", "boxed", True),
        ("first \\boxed{1} then \\boxed{7}", "7", "7", "boxed", True),
        ("The sum is 5 + 7 = 12.\n#### 12", "12", "12", "hash", True),
        ("#### 1,234 and later 9", "1234", "1,234", "hash", True),
        ("7 + 8 is equal to 54.", "15", "54", "last_number", False),
        ("2 + 3 = 5. That is all.", "5", "5", "last_number", True),
        ("It is one half: $\\frac{1}{2}$", "\\frac{1}{2}", "1/2", "math_verify", True),
        ("I do not know.", "5", None, "none", False),
    ],
)
def test_fallback_order_and_rule(
    text: str, reference: str, answer: str | None, rule: str, correct: bool
) -> None:
    j = judge(text, reference)
    assert (j.rule, j.correct) == (rule, correct)
    if rule != "math_verify":
        assert j.answer == answer


def test_eval_writes_auditable_responses(tiny_pair: TinyPair, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["eval", "--run-dir", str(run_dir), "--model", str(tiny_pair.student_dir),
            "--n-prompts", "2", "--modes", "both", "--n", "2", "--k", "1,2", "--max-tokens", "6",
            "--thinking-budget", "3", "--name", "audit"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(run_dir / "eval" / "audit.responses.parquet").to_pylist()
    # 2 prompts x 2 samples in each of 2 modes, plus the budget curve's 2 x 2 (think)
    assert len(rows) == 12
    assert {r["mode"] for r in rows} == {"think", "no_think"}
    assert {r["budget"] for r in rows} == {None, 3}
    for r in rows:
        j = judge(r["response"], r["reference"])
        assert (r["rule"], r["correct"], r["answer"]) == (j.rule, j.correct, j.answer)
    stored = json.loads((run_dir / "eval" / "audit.json").read_text())
    think = [r for r in rows if r["mode"] == "think" and r["budget"] is None]
    assert stored["modes"]["think"]["pass@1"] == sum(r["correct"] for r in think) / len(think)
