"""benchmarks/gpu_check.py --cpu: the first-GPU check runs end to end on CPU with tiny shapes, so
it cannot rot before a GPU machine is lent (the GPU run itself: docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyPair

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
def test_gpu_check_passes_on_cpu(tiny_pair: TinyPair, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu",
               "--student", str(tiny_pair.student_dir), "--teacher", str(tiny_pair.teacher_dir),
               "--root", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"], result
    (rank,) = result["engines_1proc"]["ranks"]
    assert rank["worker_device"] == rank["expected_device"] == "cpu"
    assert rank["sync_path"] == "rpc" and rank["sync_gb"] > 0
    assert rank["greedy_token_agreement"] == 1.0  # fp32: exact after the sync
    assert result["onpolicy_2proc"]["steps"] == [0, 1, 2, 3, 4]
    assert result["resume_2proc"]["new_steps"] == [5, 6]  # resumed from the step-5 checkpoint
