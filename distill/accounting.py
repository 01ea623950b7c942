"""GpuLedger: device-hours, tokens and FLOPs per phase, so runs compare with RL by one meter.

Device-hours = wall-clock seconds x devices *held* during the phase / 3600: a teacher's GPUs count
while reserved, not only while busy. On a CPU-only machine the device is the CPU (one device per
process) and reports say "CPU device-hours", never GPU-hours.

FLOPs (FACTS.md): a forward pass costs about 2·N FLOPs per token for N parameters (the attention
term 4·L·d·context is added by callers that know the context); training costs 3x forward, 6·N.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill.rundir import atomic_write_json, read_json

PHASES = ("teacher.generate", "teacher.score", "student.sample", "student.train", "eval")


def device_kind() -> str:
    """'cuda:<name>' on a GPU, else 'cpu'."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def forward_flops(n_params: int, tokens: int) -> float:
    return 2.0 * n_params * tokens


def train_flops(n_params: int, tokens: int) -> float:
    return 6.0 * n_params * tokens


@dataclass
class PhaseTotals:
    seconds: float = 0.0  # wall-clock
    device_seconds: float = 0.0  # wall-clock x devices held
    tokens: int = 0
    flops: float = 0.0
    calls: int = 0


@dataclass
class Meter:
    """What a phase reports while it runs: tokens and FLOPs it processed."""

    tokens: int = 0
    flops: float = 0.0

    def add(self, tokens: int, flops: float = 0.0) -> None:
        self.tokens += tokens
        self.flops += flops


class GpuLedger:
    """Accumulates PhaseTotals by phase name; `save` writes ledger.json atomically."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device or device_kind()
        self.phases: dict[str, PhaseTotals] = {}

    @contextmanager
    def phase(self, name: str, devices: int = 1) -> Iterator[Meter]:
        """Meter the body: `with ledger.phase("teacher.score", devices=8) as m: ...; m.add(n)`."""
        assert devices >= 1, devices
        meter = Meter()
        start = time.perf_counter()
        try:
            yield meter
        finally:
            seconds = time.perf_counter() - start
            totals = self.phases.setdefault(name, PhaseTotals())
            totals.seconds += seconds
            totals.device_seconds += seconds * devices
            totals.tokens += meter.tokens
            totals.flops += meter.flops
            totals.calls += 1

    def device_hours(self) -> dict[str, float]:
        return {name: t.device_seconds / 3600 for name, t in self.phases.items()}

    def total_device_hours(self) -> float:
        return sum(self.device_hours().values())

    def merge(self, other: GpuLedger) -> None:
        for name, t in other.phases.items():
            mine = self.phases.setdefault(name, PhaseTotals())
            mine.seconds += t.seconds
            mine.device_seconds += t.device_seconds
            mine.tokens += t.tokens
            mine.flops += t.flops
            mine.calls += t.calls

    def to_json(self) -> dict[str, object]:
        return {
            "device": self.device,
            "unit": "GPU-hours" if self.device.startswith("cuda") else "CPU device-hours",
            "phases": {name: asdict(t) for name, t in self.phases.items()},
            "device_hours": self.device_hours(),
            "total_device_hours": self.total_device_hours(),
        }

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> GpuLedger:
        data = read_json(path)
        ledger = cls(device=str(data["device"]))
        for name, t in data["phases"].items():
            ledger.phases[name] = PhaseTotals(**t)
        return ledger

    @classmethod
    def load_or_new(cls, path: Path) -> GpuLedger:
        return cls.load(path) if path.exists() else cls()
