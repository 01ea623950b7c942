"""Table 21 in miniature: off-policy, then on-policy distillation vs RL, by device-hours.

    python benchmarks/table21/run.py --quick                 # about 10 minutes on 2 free CPU cores
    python benchmarks/table21/run.py                         # the full run, about 45 minutes
    python benchmarks/table21/run.py --quick --out runs/t21 --threads 1   # a shared machine

Everything goes through distill's CLI, one subprocess per command, exactly as a user types them:

    distill generate   the embedded teacher answers the training prompts in both modes
    distill offpolicy  the 2-layer student is fine-tuned on the kept answers
    distill onpolicy   (a) from that checkpoint: the student samples, the teacher scores, reverse KL
    distill rl         (b) from the same checkpoint: GRPO with the answer-correctness reward
    distill eval       pass@1 and pass@k per mode, on the held-out split, for every model
    distill report compare   the Table 21 shape (device-hours per phase, metrics) and a PNG

Fairness: both methods sample with the same sampler (`--sampler`, passed to both commands; both
then share distill/sampling.py, the same LoRA, fused-loss and accelerate paths), and the benchmark
stops if their manifests record a different sampler, precision, loss path or process layout; each
report row carries that setup, so `report compare` shows it. Both start from the same off-policy
checkpoint, train on the same prompts
(`--n-prompts`, same seed) with each command's own default per-step settings, and are evaluated on
the same held-out problems with the same sampling (the paper's presets per mode) and seeds. Each
method's learning rate is chosen by its own training objective on training prompts, never by the
held-out numbers: on-policy's reverse KL on its own samples falls at 1e-4 (it rose at 5e-4); RL's
mean reward rises without its greedy accuracy on training prompts collapsing (rl_lr_sweep.py; the
README has the sweep). Each method has a stated step cap (PLANS below); RL gets more steps than
on-policy, so a cap can only favour RL. Device-hours are the ledger's own, per run directory,
without the eval phases. The last stdout line is JSON: {"offpolicy": {...}, "onpolicy": {...},
"rl": {...}, "teacher": {...}, "student_init": {...}}, each with pass1 and passk per mode and
device_hours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill.report_schema import run_setup


@dataclass(frozen=True, kw_only=True)
class Plan:
    train_prompts: int  # the same prompts for teacher data, on-policy and RL
    eval_prompts: int  # held-out problems (the task's eval split)
    samples: int  # samples per prompt and mode at evaluation: pass@1 and pass@k, k = samples
    offpolicy_steps: int
    offpolicy_batch: int = 64
    offpolicy_lr: float = 3e-3  # the embedded teacher's SFT rate; the shared start, not a method
    onpolicy_steps: int
    onpolicy_lr: float = 1e-4  # its reverse KL on its own samples falls (rose at 5e-4)
    rl_steps: int
    rl_lr: float = 5e-5  # its mean reward on training prompts rises: rl_lr_sweep.py, README
    max_tokens: int = 48  # the longest reference response is about 30 tokens
    seed: int = 0


PLANS = {
    "quick": Plan(
        train_prompts=1024,
        eval_prompts=48,
        samples=8,
        offpolicy_steps=600,
        onpolicy_steps=40,
        rl_steps=80,
    ),
    "full": Plan(
        train_prompts=2048,
        eval_prompts=128,
        samples=16,
        offpolicy_steps=600,
        onpolicy_steps=120,
        rl_steps=360,
    ),
}
EVAL_PHASES = ("eval",)  # metered, but not part of a method's training cost


def distill(*args: str, env: dict[str, str], log: Path) -> None:
    """One `distill` command; its output goes to `log`, and a failure stops the benchmark."""
    command = ["distill", *args]
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    print(f"  {time.monotonic() - started:6.0f} s  distill {' '.join(args)}", flush=True)
    if done.returncode != 0:
        sys.exit(f"`distill {' '.join(args)}` failed (exit {done.returncode}); see {log}")


def training_hours(run_dir: Path) -> dict[str, float]:
    ledger = json.loads((run_dir / "ledger.json").read_text())
    hours = {str(k): float(v) for k, v in ledger.get("device_hours", {}).items()}
    return {k: v for k, v in hours.items() if not k.endswith(EVAL_PHASES)}


def scores(run_dir: Path, name: str, k: int) -> dict[str, dict[str, float]]:
    result = json.loads((run_dir / "eval" / f"{name}.json").read_text())
    return {
        "pass1": {m: float(v["pass@1"]) for m, v in result["modes"].items()},
        "passk": {m: float(v[f"pass@{k}"]) for m, v in result["modes"].items()},
    }


def metrics(measured: dict[str, Any], k: int) -> dict[str, float]:
    out = {f"pass@1_{m}": v for m, v in measured["pass1"].items()}
    return out | {f"pass@{k}_{m}": v for m, v in measured["passk"].items()}


def same_setup(onpolicy_dir: Path, rl_dir: Path) -> dict[str, str]:
    """The setup both methods were built with (manifest.json); stop the benchmark if they differ."""
    on, rl = run_setup(onpolicy_dir), run_setup(rl_dir)
    differ = {k: (on.get(k), rl.get(k)) for k in on.keys() | rl.keys() if on.get(k) != rl.get(k)}
    if differ or not on:
        sys.exit(f"on-policy and RL were built differently: {differ or 'no setup recorded'}")
    return on


def report(
    method: str,
    hours: dict[str, float],
    measured: dict[str, Any],
    k: int,
    start: dict[str, Any],
    setup: dict[str, str],
) -> dict[str, Any]:
    """One row in the import schema of `distill report compare` (distill/report_schema.py).

    Its curve runs from the shared off-policy point to this method's end, in cumulative hours.
    """
    base = 0.0 if start is measured else float(start["device_hours"])
    curve = [{"device_hours": base + sum(hours.values()), **metrics(measured, k)}]
    if start is not measured:
        curve.insert(0, {"device_hours": base, **metrics(start, k)})
    return {
        "curve": curve,
        "schema": "distill.report/1",
        "method": method,
        "device": "cpu",
        "device_hours": hours,
        "eval": {"final": metrics(measured, k)},
        "eval_set": {"prompts": "embedded eval split", "n": measured["n_prompts"], "seed": 1},
        "setup": setup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Table 21 in miniature")
    parser.add_argument("--quick", action="store_true", help="the <= 10 minute variant")
    parser.add_argument("--out", type=Path, default=Path("runs/table21"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument(
        "--sampler", default="auto", help="the student sampler of BOTH methods: auto, hf or vllm"
    )
    args = parser.parse_args()
    plan = PLANS["quick" if args.quick else "full"]
    out: Path = args.out / ("quick" if args.quick else "full")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    env = dict(os.environ, COLUMNS="160")  # rich tables in the log stay readable
    if args.threads:
        env["OMP_NUM_THREADS"] = str(
            args.threads
        )  # infrastructure: on a shared machine 1 is fastest
    k, seed, tokens = plan.samples, str(plan.seed), str(plan.max_tokens)
    common = ["--n-prompts", str(plan.train_prompts), "--max-tokens", tokens, "--seed", seed]
    print(f"Table 21 in miniature ({'quick' if args.quick else 'full'}): {asdict(plan)}")
    print(f"runs in {out}; every command and its output in {log}")
    started = time.monotonic()

    base, onp, rl = out / "offpolicy", out / "onpolicy", out / "rl"
    distill("generate", "--run-dir", str(base), "--modes", "both", *common, env=env, log=log)
    distill(
        "offpolicy", "--run-dir", str(base), "--steps", str(plan.offpolicy_steps),
        "--batch-size", str(plan.offpolicy_batch), "--micro-batch-size", str(plan.offpolicy_batch),
        "--lr", str(plan.offpolicy_lr),
        "--seed", seed, env=env, log=log,
    )  # fmt: skip
    start = str(base / "offpolicy" / "checkpoint")
    distill(
        "onpolicy", "--run-dir", str(onp), "--student", start, "--steps", str(plan.onpolicy_steps),
        "--lr", str(plan.onpolicy_lr), "--sampler", args.sampler, *common, env=env, log=log,
    )  # fmt: skip
    distill(
        "rl", "--run-dir", str(rl), "--student", start, "--steps", str(plan.rl_steps),
        "--lr", str(plan.rl_lr), "--eval-prompts", str(plan.eval_prompts),
        "--sampler", args.sampler, *common, env=env, log=log,
    )  # fmt: skip
    setup = same_setup(onp, rl)

    from distill import embedded  # cached by `distill generate`: only the paths are read

    assets = embedded.build(log=lambda _: None)
    models = {
        "teacher": (base, str(assets.teacher)),
        "student_init": (base, str(assets.student)),
        "offpolicy": (base, start),
        "onpolicy": (onp, str(onp / "onpolicy" / "checkpoint")),
        "rl": (rl, str(rl / "rl" / "checkpoint")),
    }
    for name, (run_dir, model) in models.items():
        distill(
            "eval", "--run-dir", str(run_dir), "--model", model, "--name", name,
            "--n-prompts", str(plan.eval_prompts), "--n", str(k), "--k", f"1,{k}",
            "--max-tokens", tokens, "--seed", seed, env=env, log=log,
        )  # fmt: skip

    results: dict[str, dict[str, Any]] = {}
    for name, (run_dir, _) in models.items():
        results[name] = {**scores(run_dir, name, k), "n_prompts": plan.eval_prompts}
    hours = {"offpolicy": training_hours(base), "onpolicy": training_hours(onp)}
    hours["rl"] = training_hours(rl)
    labels = {
        "offpolicy": "off-policy distillation",
        "rl": "+ RL (GRPO)",
        "onpolicy": "+ on-policy distillation",
    }
    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    setups = {"offpolicy": run_setup(base), "onpolicy": setup, "rl": setup}
    for name, label in labels.items():
        results[name]["device_hours"] = sum(hours[name].values())
        row = report(label, hours[name], results[name], k, results["offpolicy"], setups[name])
        (reports / f"{name}.json").write_text(json.dumps(row, indent=1))
    plot = out / "table21.png"
    distill(
        "report", "compare", *(str(reports / f"{n}.json") for n in labels),
        "--baseline", str(reports / "rl.json"), "--plot", str(plot), env=env, log=log,
    )  # fmt: skip
    print((log.read_text().rsplit("$ distill report compare", 1)[1]).split("\n", 1)[1])

    print("compared, from the same off-policy checkpoint and on the same held-out problems:")
    print(f"  on-policy distillation: {plan.onpolicy_steps} steps, lr {plan.onpolicy_lr:g}")
    print(f"  RL (GRPO):              {plan.rl_steps} steps, lr {plan.rl_lr:g}")
    print("  (per-step settings: each command's defaults; each lr by its own training objective)")
    print(f"  both built alike: {', '.join(f'{k} {v}' for k, v in setup.items())}")
    print(f"  training prompts {plan.train_prompts}, held-out {plan.eval_prompts}, "
          f"{k} samples per prompt and mode; plot {plot}")  # fmt: skip
    for name in ("teacher", "student_init", "offpolicy", "rl", "onpolicy"):
        r = results[name]
        h = f"{r['device_hours'] * 3600:7.0f} device-s" if "device_hours" in r else " " * 16
        print(
            f"  {name:13s} {h}  pass@1 think {r['pass1']['think']:.3f} "
            f"no_think {r['pass1']['no_think']:.3f}  pass@{k} think {r['passk']['think']:.3f} "
            f"no_think {r['passk']['no_think']:.3f}"
        )
    print(f"wall time {time.monotonic() - started:.0f} s")
    for r in results.values():
        r.pop("n_prompts")
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
