"""Response filters on crafted responses: truncated, empty, repetitive, wrong, and math-verify."""

from __future__ import annotations

import pytest

from distill.offpolicy.filters import repetition_score, verdict
from distill.tasks import verify
from distill.teacher_data import VERDICTS


def judge(answer: str, reference: str | None = "12", **kw: object) -> tuple[str, bool | None]:
    args: dict = {
        "response_ids": list(range(40)),
        "answer_text": answer,
        "finish_reason": "stop",
        "reference": reference,
        "repetition_threshold": 0.5,
    }
    return verdict(**(args | kw))


def test_each_filter_removes_its_case_in_order() -> None:
    assert judge("The answer is \\boxed{12}.") == ("kept", True)
    assert judge("The answer is \\boxed{12}.", finish_reason="length") == ("truncated", True)
    assert judge("   ", budget_exhausted=True) == ("truncated", False)  # budget ran out, no answer
    assert judge("\\boxed{12}", budget_exhausted=True) == ("kept", True)  # answered after it
    assert judge(" \n ") == ("empty", False)
    loop = [1, 2, 3, 4] * 20
    assert judge("\\boxed{12}", response_ids=loop) == ("repetitive", True)
    assert judge("The answer is \\boxed{13}.") == ("wrong", False)
    assert judge("no reference here", reference=None) == ("kept", None)
    assert VERDICTS[0] == "kept" and set(VERDICTS) == {
        "kept", "truncated", "empty", "repetitive", "wrong"
    }  # fmt: skip


def test_repetition_score() -> None:
    assert repetition_score(list(range(50))) == 0.0
    assert repetition_score([7] * 50) == pytest.approx(46 / 47)
    assert repetition_score([1, 2, 3]) == 0.0  # too short to judge
    half = list(range(20)) + list(range(20))
    assert repetition_score(half) == pytest.approx(17 / 37)


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{0.5}", "1/2", True),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
        ("\\boxed{x^2 + 1}", "1 + x^2", True),
        ("\\boxed{\\frac{1}{3}}", "0.5", False),
        ("The answer is \\boxed{12}.", "12", True),
        ("The answer is \\boxed{13}.", "12", False),
        ("I do not know", "1/3", False),
    ],
)
def test_math_verify_checks_non_integer_answers(
    answer: str, reference: str, expected: bool
) -> None:
    assert verify(answer, reference) is expected
