"""`distill plan --max-staleness`: the held device-hours of on-policy steps in series and
overlapped, from the same phase estimates, with the assumptions printed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from cli import app
from distill.errors import DistillError
from distill.plan import PAPER_SCALE, describe, estimate, held

runner = CliRunner()


def test_overlap_hides_the_shorter_of_scoring_and_training() -> None:
    a = replace(PAPER_SCALE, max_staleness=1)
    _, on, _ = estimate(a)
    h = held(a, on)
    hours = {p.phase: p.device_hours for p in on.phases}
    sample = hours["student.sample"] / h.student_devices
    score, train = hours["teacher.score"] / h.teacher_devices, hours["student.train"] / 8
    whole = sample + score + train
    assert h.ratio == pytest.approx(max(sample + train, score, whole / 2) / whole)
    assert 0 < h.ratio < 1 and 0 < h.teacher_busy <= 1 and h.student_busy == pytest.approx(1)
    assert any(row[0] == "on-policy max staleness" for row in describe(a))


def test_short_responses_save_more_than_long_ones() -> None:
    """Sampling is what overlap cannot hide (the student's devices sample and train): the
    shorter the responses, the larger the share scoring takes, the larger the saving."""
    ratios = []
    for length in (512, 8192):
        a = replace(PAPER_SCALE, max_staleness=1, response_len=length)
        ratios.append(held(a, estimate(a)[1]).ratio)
    assert ratios[0] < ratios[1]


def test_plan_prints_the_held_estimate_and_refuses_bad_counts() -> None:
    out = runner.invoke(app, ["plan", "--max-staleness", "1", "--json"])
    assert out.exit_code == 0, out.output
    found = json.loads(out.output)["onpolicy_held"]
    assert found["overlapped_hours"] < found["series_hours"]
    out = runner.invoke(app, ["plan", "--max-staleness", "1"])
    assert "in series" in out.output and "Assumed" in out.output
    with pytest.raises(DistillError):
        replace(PAPER_SCALE, student_devices=0).check()
