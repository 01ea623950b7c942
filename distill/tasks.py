"""The embedded task: two-digit addition and subtraction, with answers checked by code.

    What is 47+85?
    <think>
    7+5=12
    4+8+1=13
    </think>

    The answer is \\boxed{132}.

Why this shape. A tiny model must become competent in about a minute of CPU, and thinking must
help it as it helps Qwen3. Digits are single tokens (Qwen's pre-tokeniser splits them), so each
line of the worked solution is one single-token fact: a column's digit sum or difference, the carry
or borrow of the line above included. The final answer then copies digits already written.
Without thinking the model must do both columns and the carry inside the answer's few positions,
which a small model learns far more slowly: after the same training, the embedded teacher is
clearly better in thinking mode (benchmarks/table21/README.md has the numbers). Prompts and steps
are written without spaces to keep examples short (about 40 tokens, template included).

Held-out problems never overlap training ones: a problem belongs to the held-out region when a
hash of its operands falls in `HELDOUT_SHARE`; `eval*` splits draw from that region only, all
other splits from the rest.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass

from distill.errors import DistillError
from teachers.chat import BUDGET_SENTENCE

HELDOUT_SHARE = 8  # about 1 problem in 8 is held out (1,554 of the 12,105)
CHAT_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # for the tokenizer corpus


@dataclass(frozen=True, kw_only=True)
class Problem:
    id: str
    prompt: str
    answer: int
    reasoning: str  # thinking-mode worked steps, without the think tags

    @property
    def final(self) -> str:
        return f"The answer is \\boxed{{{self.answer}}}."


def add_steps(a: int, b: int) -> list[str]:
    """Column addition of two-digit numbers, ones first; the tens line adds the carry (0 or 1)."""
    ones = a % 10 + b % 10
    carry = ones // 10
    return [f"{a % 10}+{b % 10}={ones}", f"{a // 10}+{b // 10}+{carry}={a // 10 + b // 10 + carry}"]


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction (a > b): borrow ten when the ones digit of a is smaller."""
    borrow = int(a % 10 < b % 10)
    ones = f"{10 * borrow + a % 10}-{b % 10}={10 * borrow + a % 10 - b % 10}"
    return [ones, f"{a // 10}-{b // 10}-{borrow}={a // 10 - b // 10 - borrow}"]


def all_operands() -> list[tuple[str, int, int]]:
    """Every problem of the task: a + b (both two-digit), and a - b with 10 <= b < a."""
    adds = [("+", a, b) for a in range(10, 100) for b in range(10, 100)]
    subs = [("-", a, b) for a in range(11, 100) for b in range(10, a)]
    return adds + subs


def is_heldout(op: str, a: int, b: int) -> bool:
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return digest[0] % HELDOUT_SHARE == 0


@functools.cache
def region(heldout: bool) -> tuple[tuple[str, int, int], ...]:
    return tuple(t for t in all_operands() if is_heldout(*t) == heldout)


def make_problem(op: str, a: int, b: int, index: int, split: str) -> Problem:
    steps, answer = (add_steps(a, b), a + b) if op == "+" else (sub_steps(a, b), a - b)
    return Problem(
        id=f"{split}-{index}",
        prompt=f"What is {a}{op}{b}?",
        answer=answer,
        reasoning="\n".join(steps),
    )


def problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """`n` distinct problems; the same (n, seed, split) always gives the same list.

    `eval*` splits are drawn from the held-out region, every other split from the training
    region, so evaluation never sees a training problem.
    """
    pool = region(split.startswith("eval"))
    if n > len(pool):
        raise DistillError(
            f"asked for {n} problems of split {split!r}, which draws from {len(pool)}: "
            f"ask for at most {len(pool)}"
        )
    chosen = random.Random(f"{split}:{seed}").sample(pool, n)
    return [make_problem(op, a, b, i, split) for i, (op, a, b) in enumerate(chosen)]


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


def verify(answer_text: str, reference: str) -> bool:
    """Is the final answer right? Integers by exact match, anything else by math-verify."""
    got = extract_answer(answer_text)
    try:
        if got is not None and int(reference) == got:
            return True
    except ValueError:
        pass
    from math_verify import parse
    from math_verify import verify as math_verify

    gold, pred = parse(f"${reference}$"), parse(answer_text.split("</think>")[-1])
    return bool(gold and pred and math_verify(gold, pred))


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text to train the embedded tokenizer on: chat-rendered prompts and both modes' responses."""
    out = [BUDGET_SENTENCE] * 50
    for p in problems(n, seed, "corpus"):
        out.append(CHAT_PROMPT.format(p.prompt + " /think /no_think"))
        out.append(response_text(p, thinking=True))
        out.append(response_text(p, thinking=False))
    return out
