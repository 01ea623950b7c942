"""The planner: parameter counts against the published ones, monotone estimates, printed
assumptions, and the documented worked example."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from cli import app
from distill.architectures import MODELS
from distill.plan import PAPER_SCALE, Assumptions, describe, estimate, ratio_decomposition

runner = CliRunner()


@pytest.mark.parametrize("size", list(MODELS))
def test_parameter_counts_match_the_published_ones(size: str) -> None:
    m = MODELS[size]
    assert m.params() == pytest.approx(m.published_total, rel=0.02)
    assert m.params(active=True) == pytest.approx(m.published_active, rel=0.02)


def hours(a: Assumptions) -> list[float]:
    return [w.device_hours for w in estimate(a)]


@pytest.mark.parametrize(
    ("field", "bigger", "grows"),
    [
        ("prompts", 8000, (0, 1)),
        ("samples", 8, (0, 1)),
        ("response_len", 16384, (0, 1, 2)),
        ("prompt_len", 2048, (0, 1, 2)),
        ("offpolicy_epochs", 4.0, (0,)),
        ("onpolicy_passes", 3.0, (1,)),
        ("rl_steps", 340, (2,)),
        ("rl_prompts_per_step", 256, (2,)),
        ("rl_rollouts", 32, (2,)),
        ("rl_response_len", 16384, (2,)),
        ("rl_logprob_passes", 2, (2,)),
        ("student", "32B", (0, 1, 2)),
    ],
)
def test_estimates_are_monotone(field: str, bigger: object, grows: tuple[int, ...]) -> None:
    base = Assumptions()
    before, after = hours(base), hours(replace(base, **{field: bigger}))
    for i in range(3):
        if i in grows:
            assert after[i] > before[i], (field, i)
        else:
            assert after[i] == pytest.approx(before[i]), (field, i)


@pytest.mark.parametrize(("field", "better"), [("mfu", 0.5), ("bandwidth_utilisation", 0.8)])
def test_higher_utilisation_costs_fewer_hours(field: str, better: float) -> None:
    base = Assumptions()
    faster = hours(replace(base, **{field: better}))
    assert all(a <= b for a, b in zip(faster, hours(base), strict=True))
    assert sum(hours(replace(base, **{field: better}))) < sum(hours(base))


def test_a_bigger_dense_teacher_costs_more_distillation_only() -> None:
    small, big = hours(Assumptions(teacher="14B")), hours(Assumptions(teacher="32B"))
    assert big[0] > small[0] and big[1] > small[1] and big[2] == pytest.approx(small[2])


def test_faster_memory_costs_fewer_hours() -> None:
    h100, h200 = hours(Assumptions(gpu="H100")), hours(Assumptions(gpu="H200"))
    assert all(b < a for a, b in zip(h100, h200, strict=True))
    assert sum(hours(Assumptions(gpu="A100"))) > sum(h100)


def test_worked_example_is_of_the_papers_order() -> None:
    """docs/accounting.md: with the paper's scale of assumptions, on-policy : RL is about 1 : 10,
    and the sampled-token count, not the per-token cost, sets it."""
    _, on, rl = estimate(PAPER_SCALE)
    assert 7 <= rl.device_hours / on.device_hours <= 13
    tokens, per_token = ratio_decomposition(on, rl)
    assert tokens == pytest.approx(10.88, rel=0.01)
    assert 0.7 < per_token < 1.1


def test_cli_prints_every_assumption_and_the_ratio() -> None:
    result = runner.invoke(app, ["plan", "--samples", "8"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, value, _ in describe(replace(Assumptions(), samples=8)):
        assert name in result.output and value in result.output
    assert "on-policy : RL = 1 : 9." in result.output


def test_cli_json_and_bad_input() -> None:
    result = runner.invoke(app, ["plan", "--json", "--gpu", "h200", "--prompts", "100"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["assumptions"]["gpu"] == "H200" and out["assumptions"]["prompts"] == 100
    assert [w["method"] for w in out["workloads"]][2] == "RL (GRPO)"
    bad = runner.invoke(app, ["plan", "--gpu", "TPU"])
    assert bad.exit_code == 2 and "--gpu" in bad.output
    bad = runner.invoke(app, ["plan", "--student", "9B"])
    assert bad.exit_code == 2 and "unknown model size" in bad.output
