"""Table 21 in miniature: from one off-policy start, on-policy distillation vs RL, pass@1 against
device-hours, three seeds, the same learning-rate sweep for both.

    python benchmarks/table21/run.py --quick                 # <= 10 minutes on 2 CPU cores
    python benchmarks/table21/run.py                         # the full run, <= 60 minutes
    python benchmarks/table21/run.py --out runs/t21 --threads 1     # on a shared machine

Everything goes through distill's CLI, one subprocess per command, as a user types them (each
command and its output land in OUT/commands.log). The plan is fixed before any comparison:

1. The pair. The student is `distill students prune --layers 1` of the embedded teacher (its
   last decoder layer, embeddings and head). The rule it must meet, checked and printed: the
   teacher costs >= 3x its matmul FLOPs per token, and after the off-policy stage the student's
   held-out pass@1 with thinking is >= 10 points below the teacher's. Otherwise the run stops.
2. The off-policy stage (per seed): `distill generate`, then `distill offpolicy` in segments at a
   constant rate, until a segment lowers the held-out loss (the student's cross-entropy on the
   worked solutions of training-region problems it never trains on) by less than 1%. The best
   checkpoint by that loss is the shared start. No later method is looked at.
3. The sweep (seed 0's start): both methods get the same three learning rates, each judged only
   by its own objective over the second half of its steps on training prompts: on-policy by the
   reverse KL on its own samples (lower), RL by its mean reward (higher).
4. The budget (per seed): `distill rl` runs in segments until `patience` segments in a row fail
   to raise its best mean training reward per step; its device-hours are the budget.
   `distill onpolicy` runs to the same budget, stopping at shares of it (`marks`).
5. Evaluation: `distill eval` after every segment of both methods, on the same held-out problems
   and sampling seeds; its time is metered in the run's ledger but not charged to the method.

Both methods use the same sampler, loss path, precision and process layout (checked from their
manifests), the same training prompts per seed and a constant learning rate after the same warmup.
The last stdout line is JSON: `offpolicy`, `onpolicy`, `rl` (each with `pass1`, `passk` per mode
and `device_hours`, means over seeds, and their `std`), `teacher`, `student_init`, `seeds`,
`pair`, `lr`, `onpolicy_hours_to_match_rl` and `pass1_at_equal_hours`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.report_schema import run_setup

MODES = ("think", "no_think")
EVAL_PHASES = ("eval",)  # metered, but not part of a method's training cost


@dataclass(frozen=True, kw_only=True)
class Plan:
    train_prompts: int  # the same prompts for teacher data, on-policy and RL (per seed)
    eval_prompts: int  # held-out problems (the task's eval split), the same for every model
    samples: int  # samples per prompt and mode at evaluation: pass@1 and pass@k, k = samples
    seeds: tuple[int, ...] = (0, 1, 2)
    student_layers: int = 1  # `distill students prune --layers`: 3.4x fewer FLOPs than the teacher
    flops_ratio_min: float = 3.0  # the pair rule: teacher FLOPs per token / student's
    headroom_min: float = 0.10  # the pair rule: teacher - student pass@1 with thinking, after SFT
    # the off-policy stage: segments until the held-out loss stops improving
    val_problems: int = (
        256  # worked solutions (both modes) of problems outside the training prompts
    )
    offpolicy_batch: int = 64
    offpolicy_lr: float = 3e-3  # the embedded teacher's own SFT rate
    offpolicy_segment: int = 100  # ~6 epochs of the ~1,000 answers kept from 1,024 prompts
    offpolicy_max_steps: int = 1500
    min_improvement: float = 0.01  # relative: a smaller drop of the held-out loss ends the stage
    # the sweep: one grid, both methods, judged by each method's own objective
    lrs: tuple[float, ...] = (2e-5, 1e-4, 5e-4)
    sweep_steps: int
    # RL's budget: segments until its own training reward plateaus
    rl_segment: int
    rl_max_segments: int
    patience: int = 2  # segments in a row without a new best mean reward end RL
    marks: tuple[float, ...] = (
        1 / 16,
        1 / 8,
        1 / 4,
        1 / 2,
        1.0,
    )  # on-policy: shares of RL's budget
    warmup_steps: int = 5
    max_tokens: int = 48  # the longest reference response is about 30 tokens


PLANS = {
    "quick": Plan(
        train_prompts=1024,
        eval_prompts=48,
        samples=4,
        seeds=(0,),
        offpolicy_max_steps=600,
        sweep_steps=30,
        rl_segment=40,
        rl_max_segments=3,
        marks=(1 / 4, 1.0),
    ),
    "full": Plan(
        train_prompts=1024,
        eval_prompts=256,
        samples=8,
        sweep_steps=100,
        rl_segment=100,
        rl_max_segments=8,
    ),
}


@dataclass
class Bench:
    """Where the run writes, how commands run, and the plan."""

    plan: Plan
    out: Path
    env: dict[str, str]
    sampler: str

    def distill(self, *args: str) -> None:
        """One `distill` command; its output goes to commands.log, a failure stops the run."""
        command = ["distill", *args]
        log = self.out / "commands.log"
        started = time.monotonic()
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(command)}\n")
            out.flush()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        print(f"  {time.monotonic() - started:6.0f} s  distill {' '.join(args)}", flush=True)
        if done.returncode != 0:
            sys.exit(f"`distill {' '.join(args)}` failed (exit {done.returncode}); see {log}")

    def evaluate(self, run_dir: Path, model: Path | str, name: str) -> dict[str, Any]:
        """pass@1 and pass@k per mode of `model` on the held-out problems (cached per name)."""
        result = run_dir / "eval" / f"{name}.json"
        k = self.plan.samples
        if not result.exists():
            self.distill(
                "eval", "--run-dir", str(run_dir), "--model", str(model), "--name", name,
                "--n-prompts", str(self.plan.eval_prompts), "--n", str(k), "--k", f"1,{k}",
                "--max-tokens", str(self.plan.max_tokens), "--seed", "0", "--sampler", "hf",
            )  # fmt: skip
        modes = json.loads(result.read_text())["modes"]
        return {
            "pass1": {m: float(v["pass@1"]) for m, v in modes.items()},
            "passk": {m: float(v[f"pass@{k}"]) for m, v in modes.items()},
        }


def training_hours(run_dir: Path) -> float:
    """The run's device-hours so far, less its evaluation phases."""
    ledger = json.loads((run_dir / "ledger.json").read_text())
    hours = {str(k): float(v) for k, v in ledger.get("device_hours", {}).items()}
    return sum(v for k, v in hours.items() if not k.endswith(EVAL_PHASES))


def logged(run_dir: Path, phase: str, key: str, first: int, last: int) -> list[float]:
    """`key` of the steps first..last-1 logged in metrics.jsonl by `phase`."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r[key]) for r in rows if r.get("phase") == phase and first <= r["step"] < last]


def heldout_loss(model_dir: Path, plan: Plan, seed: int) -> float:
    """Cross-entropy per token of the worked solutions (both modes) of `val_problems` problems
    from the training region that are not among this seed's training prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.batch import collate, next_token_view
    from distill.embedded import reference_examples
    from distill.logits_loss import cross_entropy
    from distill.prompts import embedded_prompts
    from distill.tasks import problems

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = {p.messages[0]["content"] for p in embedded_prompts(plan.train_prompts, seed, "train")}
    unseen = [
        p for p in problems(2 * plan.val_problems, seed, "offpolicy-val") if p.prompt not in seen
    ]
    examples = reference_examples(tokenizer, unseen[: plan.val_problems])
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            batch = collate(examples[i : i + 64], int(tokenizer.pad_token_id))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            shifted, targets, mask, _, _ = next_token_view(logits, batch)
            total += float((cross_entropy(shifted, targets, len(tokenizer)) * mask).sum())
            tokens += int(mask.sum())
    return total / tokens


def offpolicy_stage(bench: Bench, pruned: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """Teacher data and SFT in segments until the held-out loss stops improving; the best
    checkpoint (copied to seed{seed}/start) and the stage's record."""
    plan, run = bench.plan, bench.out / f"seed{seed}" / "offpolicy"
    start = bench.out / f"seed{seed}" / "start"
    record_file = bench.out / f"seed{seed}" / "offpolicy.json"
    if record_file.exists():
        return start, json.loads(record_file.read_text())
    shutil.rmtree(run, ignore_errors=True)  # a stage cut off midway starts again (seconds)
    common = ["--n-prompts", str(plan.train_prompts), "--max-tokens", str(plan.max_tokens)]
    bench.distill(
        "generate", "--run-dir", str(run), "--modes", "both", *common, "--seed", str(seed)
    )
    losses: list[tuple[int, float]] = []
    best = math.inf
    for steps in range(
        plan.offpolicy_segment, plan.offpolicy_max_steps + 1, plan.offpolicy_segment
    ):
        bench.distill(
            "offpolicy", "--run-dir", str(run), "--student", str(pruned), "--steps", str(steps),
            "--batch-size", str(plan.offpolicy_batch),
            "--micro-batch-size", str(plan.offpolicy_batch), "--lr", str(plan.offpolicy_lr),
            "--min-lr-ratio", "1", "--save-every", str(plan.offpolicy_segment),
            "--seed", str(seed), "--force",
        )  # fmt: skip
        loss = heldout_loss(run / "offpolicy" / "checkpoint", plan, seed)
        losses.append((steps, loss))
        print(f"    seed {seed}: off-policy step {steps}, held-out loss {loss:.4f}", flush=True)
        improved = loss < best * (1 - plan.min_improvement)
        if loss < best:
            best = loss
            shutil.rmtree(start, ignore_errors=True)
            shutil.copytree(run / "offpolicy" / "checkpoint", start)
        if not improved:
            break
    record = {"heldout_loss": losses, "device_hours": training_hours(run)}
    record_file.write_text(json.dumps(record))
    return start, record


def sweep(bench: Bench, start: Path) -> dict[str, Any]:
    """Each method at each learning rate for `sweep_steps` from seed 0's start; the rate its own
    objective prefers over the second half of the steps (every step's value)."""
    plan = bench.plan
    found: dict[str, Any] = {"onpolicy": {}, "rl": {}}
    last = range(plan.sweep_steps // 2, plan.sweep_steps)
    for lr in plan.lrs:
        for method, key in (("onpolicy", "kl"), ("rl", "reward")):
            run = bench.out / "sweep" / f"{method}-lr{lr:g}"
            if not (run / method / "checkpoint").exists():
                train(bench, method, run, start, plan.sweep_steps, lr, seed=0)
            values = logged(run, method, key, last.start, last.stop)
            found[method][f"{lr:g}"] = sum(values) / len(values)
    chosen = {
        "onpolicy": min(plan.lrs, key=lambda lr: found["onpolicy"][f"{lr:g}"]),
        "rl": max(plan.lrs, key=lambda lr: found["rl"][f"{lr:g}"]),
    }
    chosen_run = bench.out / "sweep" / f"onpolicy-lr{chosen['onpolicy']:g}"
    per_step = training_hours(chosen_run) / plan.sweep_steps  # on-policy's cost of one step
    return {"objective": found, "chosen": chosen, "per_step": per_step}


def train(
    bench: Bench, method: str, run: Path, start: Path, steps: int, lr: float, seed: int
) -> None:
    """`distill onpolicy` or `distill rl` to `steps` (a rerun with more steps resumes)."""
    plan = bench.plan
    args = [
        method, "--run-dir", str(run), "--student", str(start), "--steps", str(steps),
        "--lr", str(lr), "--min-lr-ratio", "1", "--warmup-steps", str(plan.warmup_steps),
        "--n-prompts", str(plan.train_prompts), "--max-tokens", str(plan.max_tokens),
        "--seed", str(seed), "--sampler", bench.sampler, "--save-every", str(steps),
        "--log-every", "1", "--force",
    ]  # fmt: skip
    if method == "rl":
        args += ["--eval-prompts", "8"]  # RL's own greedy check; an eval phase, not charged
    bench.distill(*args)


def point(
    bench: Bench, method: str, seed: int, start: Path, steps: int, lr: float
) -> dict[str, Any]:
    """Train `method` on to `steps`, then evaluate it: steps, training device-hours and pass@1/k.

    Each point is appended to the run's points.jsonl once measured, and a rerun reads it back:
    the ledger only knows the run's hours *now*, not at an earlier segment's end."""
    run = bench.out / f"seed{seed}" / method
    book = run / "points.jsonl"
    known = [json.loads(x) for x in book.read_text().splitlines()] if book.exists() else []
    for p in known:
        if p["steps"] == steps:
            return p
    if known and known[-1]["steps"] > steps:
        sys.exit(f"{run} is past step {steps} ({known[-1]['steps']}): delete it to measure again")
    train(bench, method, run, start, steps, lr, seed)
    hours = training_hours(run)
    measured = bench.evaluate(run, run / method / "checkpoint", f"step{steps}")
    p = {"steps": steps, "hours": hours, **measured}
    with book.open("a") as f:
        f.write(json.dumps(p) + "\n")
    return p


def rl_to_plateau(bench: Bench, start: Path, lr: float, seed: int) -> list[dict[str, Any]]:
    """RL segments until `patience` segments in a row fail to raise the best mean training reward
    per step (at most `rl_max_segments`); a point after every segment."""
    plan, run = bench.plan, bench.out / f"seed{seed}" / "rl"
    points: list[dict[str, Any]] = []
    best, since_best = -math.inf, 0
    for n in range(1, plan.rl_max_segments + 1):
        steps = n * plan.rl_segment
        measured = point(bench, "rl", seed, start, steps, lr)
        reward = np.asarray(logged(run, "rl", "reward", steps - plan.rl_segment, steps))
        mean, se = float(reward.mean()), float(reward.std(ddof=1) / math.sqrt(len(reward)))
        points.append({**measured, "reward": mean, "reward_se": se})
        print(f"    seed {seed}: RL step {steps}, reward {mean:.3f} ± {se:.3f}", flush=True)
        best, since_best = (mean, 0) if mean > best else (best, since_best + 1)
        if since_best == plan.patience:
            break
    return points


def onpolicy_to_budget(
    bench: Bench, start: Path, lr: float, seed: int, budget: float, per_step: float
) -> list[dict[str, Any]]:
    """On-policy segments that stop at each share of RL's device-hours (steps from the cost per
    step measured so far, first from the sweep); a point after each."""
    points: list[dict[str, Any]] = []
    steps = 0
    for mark in bench.plan.marks:
        steps = max(steps + 1, math.ceil(mark * budget / per_step))
        points.append({**point(bench, "onpolicy", seed, start, steps, lr), "mark": mark})
        per_step = points[-1]["hours"] / steps
        share = points[-1]["hours"] / budget
        print(f"    seed {seed}: on-policy step {steps}, {share:.2f} of RL's hours", flush=True)
    return points


def mode_mean(point: dict[str, Any], key: str = "pass1") -> float:
    return sum(point[key][m] for m in MODES) / len(MODES)


def seed_curves(
    per_seed: list[list[dict[str, Any]]],
    rl: list[list[dict[str, Any]]],
    start: list[dict[str, Any]],
    value: Callable[[dict[str, Any]], float],
) -> list[list[tuple[float, float]]]:
    """Each seed's (share of its RL budget, `value`) points, from its off-policy start on."""
    return [
        [(0.0, value(start[s]))] + [(p["hours"] / rl[s][-1]["hours"], value(p)) for p in points]
        for s, points in enumerate(per_seed)
    ]


def seed_mean(
    per_seed: list[list[dict[str, Any]]],
    rl: list[list[dict[str, Any]]],
    start: list[dict[str, Any]],
    value: Callable[[dict[str, Any]], float],
    grid: np.ndarray,
) -> np.ndarray:
    """The mean over seeds of `value` at `grid` (shares of each seed's RL budget)."""
    return np.mean([on_grid(c, grid) for c in seed_curves(per_seed, rl, start, value)], 0)


def on_grid(curve: list[tuple[float, float]], grid: np.ndarray) -> np.ndarray:
    """A measured curve (share of RL's hours, value), linear between points, at `grid`."""
    xs, ys = zip(*curve, strict=True)
    return np.interp(grid, xs, ys)


def hours_to_reach(grid: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """The first share of RL's hours at which `curve` reaches `target` (linear between points)."""
    above = np.nonzero(curve >= target - 1e-12)[0]
    if len(above) == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(grid[0])
    x0, x1, y0, y1 = grid[i - 1], grid[i], curve[i - 1], curve[i]
    return float(x0 + (x1 - x0) * (target - y0) / (y1 - y0))


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of pass@1 and pass@k per mode, and of device-hours."""
    out: dict[str, Any] = {}
    for key in ("pass1", "passk"):
        out[key] = {m: float(np.mean([p[key][m] for p in points])) for m in MODES}
        out[f"{key}_std"] = {m: float(np.std([p[key][m] for p in points])) for m in MODES}
    out["device_hours"] = float(np.mean([p["hours"] for p in points]))
    return out


def plot(
    path: Path, curves: dict[str, list[list[dict[str, Any]]]], start: list[dict[str, Any]]
) -> None:
    """pass@1 per mode against share of RL's device-hours: each seed faint, the mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    grid = np.linspace(0.0, 1.0, 65)
    for ax, mode in zip(axes, MODES, strict=True):
        for method, color in (("onpolicy", "tab:blue"), ("rl", "tab:red")):
            ys = []
            for curve in seed_curves(
                curves[method], curves["rl"], start, lambda p, mode=mode: p["pass1"][mode]
            ):
                ax.plot(*zip(*curve, strict=True), color=color, alpha=0.25, marker=".")
                ys.append(on_grid(curve, grid))
            mean, lo, hi = np.mean(ys, 0), np.min(ys, 0), np.max(ys, 0)
            ax.plot(grid, mean, color=color, lw=2, label=method)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.1)
        ax.set_title(f"pass@1, {mode}")
        ax.set_xlabel("device-hours, share of RL's budget (after the off-policy start)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_row(
    method: str, bench: Bench, points: list[dict[str, Any]], k: int, setup: dict[str, str]
) -> dict[str, Any]:
    """A `distill report compare` row (distill/report_schema.py): seed 0's curve and final point."""

    def metrics(p: dict[str, Any]) -> dict[str, float]:
        return {f"pass@1_{m}": p["pass1"][m] for m in MODES} | {
            f"pass@{k}_{m}": p["passk"][m] for m in MODES
        }

    return {
        "schema": "distill.report/1",
        "method": method,
        "device": "cpu",
        "device_hours": {"training": points[-1]["hours"]},
        "curve": [{"device_hours": p["hours"], **metrics(p)} for p in points],
        "eval": {"final": metrics(points[-1])},
        "eval_set": {"prompts": "embedded eval split", "n": bench.plan.eval_prompts, "seed": 0},
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
    env = dict(os.environ, COLUMNS="200")  # rich tables in the log stay readable
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # on a shared machine 1 is fastest
    bench = Bench(plan, out, env, args.sampler)
    print(f"Table 21 in miniature ({'quick' if args.quick else 'full'}): {asdict(plan)}")
    print(f"runs in {out}; every command and its output in {out / 'commands.log'}")
    started = time.monotonic()

    from distill import embedded  # built (and cached) here once: only the paths are read after

    assets = embedded.build(log=lambda _: None)
    pruned = out / "student"
    if not pruned.exists():
        bench.distill("students", "prune", "--from", str(assets.teacher), "--layers",
                      str(plan.student_layers), "--out", str(pruned))  # fmt: skip
    teacher = bench.evaluate(out / "models", assets.teacher, "teacher")
    student_init = bench.evaluate(out / "models", pruned, "student_init")
    flops_ratio = matmul_ratio(assets.teacher, pruned)

    starts, offpolicy = [], []
    for seed in plan.seeds:
        start, record = offpolicy_stage(bench, pruned, seed)
        measured = bench.evaluate(out / f"seed{seed}", start, "start")
        starts.append(start)
        offpolicy.append({**record, **measured, "hours": record["device_hours"]})
    headroom = teacher["pass1"]["think"] - float(np.mean([p["pass1"]["think"] for p in offpolicy]))
    pair = {"flops_ratio": flops_ratio, "headroom_think": headroom, "layers": plan.student_layers}
    print(f"  the pair: teacher/student FLOPs per token {flops_ratio:.2f} "
          f"(rule >= {plan.flops_ratio_min}), thinking pass@1 teacher - student {headroom:.3f} "
          f"(rule >= {plan.headroom_min})", flush=True)  # fmt: skip
    if flops_ratio < plan.flops_ratio_min or headroom < plan.headroom_min:
        sys.exit(f"the pair breaks the rule stated before the comparison: {pair}")

    lr = sweep(bench, starts[0])
    chosen = lr["chosen"]
    print(f"  learning rates by each method's own objective: {lr}", flush=True)
    curves: dict[str, list[list[dict[str, Any]]]] = {"rl": [], "onpolicy": []}
    for seed, start in zip(plan.seeds, starts, strict=True):
        curves["rl"].append(rl_to_plateau(bench, start, chosen["rl"], seed))
        budget = curves["rl"][-1][-1]["hours"]
        curves["onpolicy"].append(
            onpolicy_to_budget(bench, start, chosen["onpolicy"], seed, budget, lr["per_step"])
        )
    setups = [
        same_setup(out / f"seed{s}" / "onpolicy", out / f"seed{s}" / "rl") for s in plan.seeds
    ]

    grid = np.linspace(0.0, 1.0, 257)
    mean_curve = {m: seed_mean(curves[m], curves["rl"], offpolicy, mode_mean, grid) for m in curves}
    rl_final = float(mean_curve["rl"][-1])
    to_match = hours_to_reach(grid, mean_curve["onpolicy"], rl_final)
    by_mode: dict[str, float | None] = {}
    for mode in MODES:

        def one(p: dict[str, Any], mode: str = mode) -> float:
            return p["pass1"][mode]

        on = seed_mean(curves["onpolicy"], curves["rl"], offpolicy, one, grid)
        rl = seed_mean(curves["rl"], curves["rl"], offpolicy, one, grid)
        by_mode[mode] = hours_to_reach(grid, on, float(rl[-1]))
    plot(out / "table21.png", curves, offpolicy)

    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    k = plan.samples
    for method, label in (("onpolicy", "+ on-policy distillation"), ("rl", "+ RL (GRPO)")):
        row = report_row(label, bench, curves[method][0], k, setups[0])
        (reports / f"{method}.json").write_text(json.dumps(row, indent=1))
    bench.distill("report", "compare", str(reports / "onpolicy.json"), str(reports / "rl.json"),
                  "--baseline", str(reports / "rl.json"))  # fmt: skip
    log = (out / "commands.log").read_text()
    print(log.rsplit("$ distill report compare", 1)[1].split("\n", 1)[1])

    results: dict[str, Any] = {
        "teacher": teacher,
        "student_init": student_init,
        "offpolicy": summarise(offpolicy),
        "onpolicy": summarise([c[-1] for c in curves["onpolicy"]]),
        "rl": summarise([c[-1] for c in curves["rl"]]),
        "seeds": list(plan.seeds),
        "pair": pair,
        "lr": lr,
        "rl_steps": [c[-1]["steps"] for c in curves["rl"]],
        "onpolicy_steps": [c[-1]["steps"] for c in curves["onpolicy"]],
        "onpolicy_hours_to_match_rl": to_match,
        "onpolicy_hours_to_match_rl_by_mode": by_mode,
        "pass1_at_equal_hours": {
            "onpolicy": float(mean_curve["onpolicy"][-1]),
            "rl": rl_final,
        },
    }
    print(f"  pass@1 (mean of modes, mean over seeds) at RL's budget: on-policy "
          f"{mean_curve['onpolicy'][-1]:.3f}, RL {rl_final:.3f}; on-policy reaches RL's final at "
          f"{'never' if to_match is None else f'{to_match:.2f} of its hours'}")  # fmt: skip
    print("  per seed: pass@1 think / no_think at the start, and each method's last point")
    for s, seed in enumerate(plan.seeds):
        r, o, st = curves["rl"][s][-1], curves["onpolicy"][s][-1], offpolicy[s]
        print(f"    seed {seed}: start {st['pass1']['think']:.3f} / {st['pass1']['no_think']:.3f}; "
              f"RL {r['steps']} steps, {r['hours'] * 3600:.0f} device-s: "
              f"{r['pass1']['think']:.3f} / {r['pass1']['no_think']:.3f}; on-policy {o['steps']} "
              f"steps, {o['hours'] * 3600:.0f} device-s: {o['pass1']['think']:.3f} / "
              f"{o['pass1']['no_think']:.3f}")  # fmt: skip
    print(f"wall time {time.monotonic() - started:.0f} s; plot {out / 'table21.png'}")
    print(json.dumps(results, sort_keys=True))


def matmul_ratio(teacher: Path, student: Path) -> float:
    """Teacher matmul FLOPs per token over the student's (distill.accounting.matmul_params)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.accounting import matmul_params

    def params(path: Path) -> int:
        config = AutoConfig.from_pretrained(path)
        return matmul_params(AutoModelForCausalLM.from_config(config))

    return params(teacher) / params(student)


def same_setup(onpolicy_dir: Path, rl_dir: Path) -> dict[str, str]:
    """The setup both methods were built with (manifest.json); stop the run if they differ."""
    on, rl = run_setup(onpolicy_dir), run_setup(rl_dir)
    differ = {k: (on.get(k), rl.get(k)) for k in on.keys() | rl.keys() if on.get(k) != rl.get(k)}
    if differ or not on:
        sys.exit(f"on-policy and RL were built differently: {differ or 'no setup recorded'}")
    return on


if __name__ == "__main__":
    main()
