"""The embedded task: worked steps are true single-digit facts, the verifier, held-out splits."""

from __future__ import annotations

import re

import pytest
from transformers import PreTrainedTokenizerFast

from distill.errors import DistillError
from distill.tasks import (
    all_operands,
    extract_answer,
    is_correct,
    make_problem,
    problems,
    region,
    response_text,
)
from teachers.chat import render_prompt

LINE = re.compile(r"^(\d+)([+-])(\d)([+-])?(\d)?=(-?\d+)$")


def test_every_worked_step_is_a_true_digit_fact_and_the_answer_copies_them() -> None:
    for op, a, b in all_operands():
        p = make_problem(op, a, b, 0, "x")
        assert p.answer == (a + b if op == "+" else a - b)
        lines = p.reasoning.split("\n")
        assert len(lines) == 2, p.reasoning
        values = []
        for line in lines:
            m = LINE.match(line)
            assert m, line
            left, op1, x, op2, y, result = m.groups()
            value = int(left) + int(x) if op1 == "+" else int(left) - int(x)
            if op2 is not None:
                value = value + int(y) if op2 == "+" else value - int(y)
            assert value == int(result), line
            assert int(left) < 20 and int(result) < 20, line  # one column at a time
            values.append(int(result))
        ones, tens = values
        # the answer is the tens line's result followed by the ones line's last digit
        assert p.answer == tens * 10 + ones % 10, p


def test_carry_and_borrow_are_written() -> None:
    assert make_problem("+", 58, 48, 0, "x").reasoning == "8+8=16\n5+4+1=10"
    assert make_problem("+", 32, 14, 0, "x").reasoning == "2+4=6\n3+1+0=4"
    assert make_problem("-", 52, 17, 0, "x").reasoning == "12-7=5\n5-1-1=3"
    assert make_problem("-", 75, 51, 0, "x").reasoning == "5-1=4\n7-5-0=2"


def test_heldout_split_never_overlaps_training_splits() -> None:
    held = {p.prompt for p in problems(len(region(True)), 0, "eval")}
    assert len(held) == len(region(True))
    for split in ("train", "teacher-train", "corpus"):
        assert not held & {p.prompt for p in problems(2000, 3, split)}
    assert len(region(True)) + len(region(False)) == len(all_operands()) == 12105


def test_problems_are_deterministic_and_distinct() -> None:
    a, b = problems(50, 1, "train"), problems(50, 1, "train")
    assert a == b
    assert len({p.prompt for p in a}) == 50
    assert [p.prompt for p in problems(50, 2, "train")] != [p.prompt for p in a]
    assert [p.id for p in a[:2]] == ["train-0", "train-1"]


def test_asking_for_more_problems_than_a_split_holds_names_the_limit() -> None:
    with pytest.raises(DistillError, match="at most 1554"):
        problems(2000, 0, "eval")


def test_verifier_reads_the_last_boxed_answer_after_thinking() -> None:
    p = make_problem("+", 47, 85, 0, "x")
    assert is_correct(response_text(p, thinking=True), 132)
    assert is_correct(response_text(p, thinking=False), 132)
    assert extract_answer("<think>\n\\boxed{5}\n</think>\n\nno answer") is None
    assert extract_answer("<think>x</think>\\boxed{1} then \\boxed{ -7 }") == -7
    assert extract_answer("The answer is 132.") is None
    assert not is_correct("<think>\n</think>\n\nThe answer is \\boxed{131}.", 132)


def test_examples_are_short_and_digits_are_single_tokens(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """The task's speed rests on these: ~40 tokens an example, one token per digit."""
    p = make_problem("+", 47, 85, 0, "x")
    prompt = render_prompt(tokenizer, [{"role": "user", "content": p.prompt}], "think")
    response = tokenizer.encode(response_text(p, thinking=True), add_special_tokens=False)
    assert len(prompt) + len(response) <= 48, (len(prompt), len(response))
    pieces = [tokenizer.decode([i]) for i in response]
    assert all(len(x) == 1 for x in pieces if any(c.isdigit() for c in x)), pieces
