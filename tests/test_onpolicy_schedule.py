"""The on-policy step plan: exact proportions, seeded placement, one pass per epoch, resumable."""

from __future__ import annotations

import pytest

from distill.errors import DistillError
from distill.onpolicy.schedule import check_modes, mode_at, position, step_slots, stratified

PLAN = {"prompts_per_step": 5, "samples_per_prompt": 2, "modes": ("think", "no_think"),
        "think_ratio": 0.5, "n_prompts": 7, "row_modes": ["think", "no_think"] * 6}  # fmt: skip


@pytest.mark.parametrize("lmbda", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_lmbda_share_is_exact_and_spread_over_steps(lmbda: float) -> None:
    steps = [step_slots(step=s, seed=3, lmbda=lmbda, **PLAN) for s in range(40)]  # type: ignore[arg-type]
    off = [sum(slot.prompt is None for slot in slots) for slots in steps]
    assert sum(off) == stratified(40 * 5, lmbda)  # floor(n · lmbda): exact, not on average
    assert max(off) - min(off) <= 1  # every step carries its share, none gets all of it
    for slots in steps:
        for slot in slots:
            assert (slot.prompt is None) == bool(slot.rows)
            assert len(slot.rows) in (0, 2)  # G teacher rows for an off-policy slot


def test_the_schedule_is_a_function_of_seed_and_step() -> None:
    a = [step_slots(step=s, seed=3, lmbda=0.3, **PLAN) for s in range(6)]  # type: ignore[arg-type]
    b = [step_slots(step=s, seed=3, lmbda=0.3, **PLAN) for s in reversed(range(6))]  # type: ignore[arg-type]
    assert a == b[::-1]  # no hidden state: computing step 5 first changes nothing
    c = [step_slots(step=s, seed=4, lmbda=0.3, **PLAN) for s in range(6)]  # type: ignore[arg-type]
    assert a != c


def test_every_prompt_once_per_epoch_and_modes_in_ratio() -> None:
    slots = [x for s in range(7) for x in step_slots(step=s, seed=0, lmbda=0.0, **PLAN)]  # type: ignore[arg-type]
    prompts = [x.prompt for x in slots]
    for epoch in range(5):
        assert sorted(prompts[epoch * 7 : (epoch + 1) * 7]) == list(range(7))  # type: ignore[type-var]
    assert sum(mode_at(q, ("think", "no_think"), 0.25) == "think" for q in range(100)) == 25
    assert position(7, 5, 0.0).prompt == 35


def test_plans_that_leave_a_mode_empty_are_refused() -> None:
    with pytest.raises(DistillError, match="no prompts in mode think"):
        check_modes(("think", "no_think"), 0.0, 0.0, [])
    with pytest.raises(DistillError, match="no kept rows in mode no_think"):
        check_modes(("think", "no_think"), 0.5, 0.2, ["think"])
    check_modes(("think",), 0.0, 0.2, ["think"])  # one mode: the ratio does not apply
