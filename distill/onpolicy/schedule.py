"""What each on-policy step trains on: prompts, modes and GKD mixing, as pure functions of the step.

Every choice is a function of (seed, step), never of a global RNG or of what ran before, so a
resumed run makes exactly the choices an uninterrupted one makes. Proportions are exact, not
expected: `stratified(n, frac)` items among the first n are chosen, so after n slots the count
is floor(n · frac) (GKD's `random.random() <= lmbda` only matches it on average, and shifts with
every call to the global RNG).

A step has `prompts_per_step` slots. A slot is on-policy (the next prompt of the prompt stream,
in the next mode of the mode stream, sampled G times by the student) or off-policy (the next G
kept rows of the teacher's dataset, RUN_DIR/teacher_data). Both streams walk a fresh seeded
permutation every epoch, so each prompt (row) is seen once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill.errors import DistillError
from distill.seeds import derive_seed
from teachers.chat import Mode

# Seed offsets keep the streams independent of each other and of the samplers.
PROMPT_STREAM, ROW_STREAM, SLOT_STREAM = 1, 2, 3


def stratified(n: int, frac: float) -> int:
    """How many of the first n items are chosen when a fraction `frac` is: floor(n · frac)."""
    return math.floor(n * frac + 1e-9)


def permuted(seed: int, stream: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(derive_seed(seed, stream * 7_919 + epoch))
    return torch.randperm(n, generator=g).tolist()


@dataclass(frozen=True, kw_only=True)
class Slot:
    """One slot of a step: `prompt` is set on-policy, `rows` off-policy."""

    mode: Mode
    prompt: int | None = None  # index into the prompt list
    rows: tuple[int, ...] = ()  # indices into the teacher's kept rows


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where the streams stand before a step: recorded in checkpoints, recomputed on resume."""

    prompt: int  # on-policy slots consumed
    offpolicy: int  # off-policy slots consumed


def position(step: int, prompts_per_step: int, lmbda: float) -> Position:
    off = stratified(step * prompts_per_step, lmbda)
    return Position(prompt=step * prompts_per_step - off, offpolicy=off)


def step_slots(
    *,
    step: int,
    seed: int,
    prompts_per_step: int,
    samples_per_prompt: int,
    lmbda: float,
    modes: Sequence[Mode],
    think_ratio: float,
    n_prompts: int,
    row_modes: Sequence[Mode] = (),
) -> list[Slot]:
    """The slots of `step`. `row_modes` is the mode of each kept teacher row (for lmbda > 0)."""
    here, after = (
        position(step, prompts_per_step, lmbda),
        position(step + 1, prompts_per_step, lmbda),
    )
    n_off = after.offpolicy - here.offpolicy
    # Which slots of this step are off-policy: a seeded permutation per step.
    order = permuted(seed, SLOT_STREAM, step, prompts_per_step)
    off_slots = set(order[:n_off])
    slots: list[Slot] = []
    q, o = here.prompt, here.offpolicy
    for j in range(prompts_per_step):
        if j in off_slots:
            G = samples_per_prompt
            rows = tuple(_row(seed, o * G + g, len(row_modes)) for g in range(G))
            slots.append(Slot(mode=row_modes[rows[0]], rows=rows))
            o += 1
        else:
            epoch, at = divmod(q, n_prompts)
            prompt = permuted(seed, PROMPT_STREAM, epoch, n_prompts)[at]
            slots.append(Slot(mode=mode_at(q, modes, think_ratio), prompt=prompt))
            q += 1
    return slots


def _row(seed: int, k: int, n_rows: int) -> int:
    epoch, at = divmod(k, n_rows)
    return permuted(seed, ROW_STREAM, epoch, n_rows)[at]


def mode_at(q: int, modes: Sequence[Mode], think_ratio: float) -> Mode:
    """Mode of the q-th on-policy prompt: thinking for exactly floor(n · think_ratio) of n."""
    if len(modes) == 1:
        return modes[0]
    think = stratified(q + 1, think_ratio) - stratified(q, think_ratio) == 1
    return "think" if think else "no_think"


def check_modes(
    modes: Sequence[Mode], think_ratio: float, lmbda: float, row_modes: Sequence[Mode]
) -> None:
    """Refuse a plan that can never put a prompt in a requested mode."""
    if not modes:
        raise DistillError("no modes requested: pass --modes think, no_think or both")
    if len(modes) == 2 and not 0.0 < think_ratio < 1.0:
        empty = "think" if think_ratio <= 0.0 else "no_think"
        raise DistillError(
            f"--think-ratio {think_ratio} leaves no prompts in mode {empty} although both modes "
            f"are requested: pass a ratio strictly between 0 and 1, or --modes {_other(empty)}"
        )
    if lmbda > 0.0:
        missing = [m for m in modes if m not in set(row_modes)]
        if missing:
            raise DistillError(
                f"--lmbda {lmbda} mixes in the teacher's dataset, but it has no kept rows in mode "
                f"{', '.join(missing)}: regenerate it with those modes (distill generate --modes "
                f"both), drop them from --modes, or pass --lmbda 0"
            )


def _other(mode: str) -> str:
    return "no_think" if mode == "think" else "think"
