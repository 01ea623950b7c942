"""The embedded task: arithmetic word problems with answers checked by code.

Each problem has a prompt, an integer answer, a worked solution (the thinking-mode reasoning:
column arithmetic one step per line) and the final line "The answer is \\boxed{N}." It needs no
download, so a fresh machine can run a whole distillation on it, and answers are verifiable, so
teacher responses can be filtered and students evaluated by pass@k.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from teachers.chat import BUDGET_SENTENCE

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kai", "Lea", "Max")
ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs", "cups", "keys")


@dataclass(frozen=True, kw_only=True)
class Problem:
    id: str
    prompt: str
    answer: int
    reasoning: str  # thinking-mode worked steps, without the think tags

    @property
    def final(self) -> str:
        return f"The answer is \\boxed{{{self.answer}}}."


def _add_steps(a: int, b: int) -> list[str]:
    """Column addition of two numbers < 100, one fact per line."""
    ones = a % 10 + b % 10
    tens = (a // 10 + b // 10) * 10
    return [
        f"{a % 10} + {b % 10} = {ones}",
        f"{a // 10 * 10} + {b // 10 * 10} = {tens}",
        f"{tens} + {ones} = {a + b}",
    ]


def _sub_steps(a: int, b: int) -> list[str]:
    """a - b by removing tens then ones (a > b, both < 100)."""
    mid = a - b // 10 * 10
    return [f"{a} - {b // 10 * 10} = {mid}", f"{mid} - {b % 10} = {mid - b % 10}"]


def _mul_steps(a: int, b: int) -> list[str]:
    """a * b with b < 10 by splitting a into tens and ones."""
    hi, lo = a // 10 * 10 * b, a % 10 * b
    return [f"{a // 10 * 10} * {b} = {hi}", f"{a % 10} * {b} = {lo}", f"{hi} + {lo} = {hi + lo}"]


def make_problem(rng: random.Random, index: int, split: str) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        steps, answer = _add_steps(a, b), a + b
    elif kind == "sub":
        a = rng.randint(30, 99)
        b = rng.randint(11, a - 1)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps, answer = _sub_steps(a, b), a - b
    else:
        a, b = rng.randint(11, 49), rng.randint(2, 9)
        q = f"{name} buys {b} boxes with {a} {item} in each. How many {item} is that?"
        steps, answer = _mul_steps(a, b), a * b
    reasoning = "\n".join(steps) + f"\nSo the answer is {answer}."
    return Problem(id=f"{split}-{index}", prompt=q, answer=answer, reasoning=reasoning)


def problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """`n` problems; the same (n, seed, split) always gives the same list. Splits never overlap."""
    rng = random.Random(f"{split}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = make_problem(rng, len(out), split)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def response_text(problem: Problem, thinking: bool) -> str:
    """The reference assistant response in a mode, as the Qwen3 template lays it out."""
    think = f"<think>\n{problem.reasoning}\n</think>\n\n" if thinking else "<think>\n\n</think>\n\n"
    return think + problem.final


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def extract_answer(text: str) -> int | None:
    """The last \\boxed{N} of the answer part (after </think>), or None."""
    answer_part = text.split("</think>")[-1]
    found = _BOXED.findall(answer_part)
    return int(found[-1]) if found else None


def is_correct(text: str, answer: int) -> bool:
    return extract_answer(text) == answer


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text to train the embedded tokenizer on: prompts and responses in both modes."""
    out = [BUDGET_SENTENCE] * 50
    for p in problems(n, seed, "corpus"):
        out.append(p.prompt + " /think /no_think")
        out.append(response_text(p, thinking=True))
        out.append(response_text(p, thinking=False))
    return out
