"""benchmarks/table21/run.py's arithmetic: curves on a common grid of RL's device-hours, the share
at which one curve first reaches a value, and the mean and spread over seeds. The run itself is
the benchmark (minutes to an hour); these are the numbers it prints from what it measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("table21_run", ROOT / "benchmarks/table21/run.py")
assert spec is not None and spec.loader is not None
table21 = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = table21  # dataclasses look their module up
spec.loader.exec_module(table21)


def test_a_curve_is_linear_between_its_measured_points_and_flat_past_the_last() -> None:
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    got = table21.on_grid([(0.0, 0.2), (0.5, 0.4), (0.8, 0.7)], grid)
    assert got == pytest.approx([0.2, 0.3, 0.4, 0.65, 0.7])


def test_hours_to_reach_interpolates_the_first_crossing() -> None:
    grid = np.linspace(0.0, 1.0, 5)  # 0, .25, .5, .75, 1
    curve = np.array([0.2, 0.3, 0.5, 0.4, 0.6])
    assert table21.hours_to_reach(grid, curve, 0.4) == pytest.approx(0.375)  # between .25 and .5
    assert table21.hours_to_reach(grid, curve, 0.5) == pytest.approx(0.5)  # exactly on a point
    assert table21.hours_to_reach(grid, curve, 0.1) == 0.0  # the start already reaches it
    assert table21.hours_to_reach(grid, curve, 0.61) is None  # never reached


def test_summarise_gives_the_mean_and_spread_over_seeds_per_mode() -> None:
    points = [
        {"pass1": {"think": 0.5, "no_think": 0.1}, "passk": {"think": 0.8, "no_think": 0.2},
         "hours": 1.0},
        {"pass1": {"think": 0.7, "no_think": 0.1}, "passk": {"think": 0.9, "no_think": 0.4},
         "hours": 3.0},
    ]  # fmt: skip
    got = table21.summarise(points)
    assert got["pass1"] == pytest.approx({"think": 0.6, "no_think": 0.1})
    assert got["pass1_std"] == pytest.approx({"think": 0.1, "no_think": 0.0})
    assert got["passk"] == pytest.approx({"think": 0.85, "no_think": 0.3})
    assert got["device_hours"] == pytest.approx(2.0)
