"""RL's learning rate by RL's own objective, on training prompts only (never the held-out split).

    OMP_NUM_THREADS=1 python benchmarks/table21/rl_lr_sweep.py \
        --student runs/table21/quick/offpolicy/offpolicy/checkpoint --lrs 2e-4,5e-5,1e-5

From the shared off-policy checkpoint, one `distill.rl.train` run per learning rate, with the
`distill rl` per-step settings the Table 21 run uses (4 prompts x 8 samples, GRPO, 48 tokens, the
same training prompts and seed). What it measures is what RL itself optimises: the mean reward of
its own samples on training prompts (first vs last window of steps), and greedy accuracy on the
first `--check` *training* prompts every `--check-every` steps, so a rate whose updates drift the
policy shows up without looking at the evaluation set. The last stdout line is JSON:
{lr: {"reward_first", "reward_last", "no_signal", "greedy": {step: {mode: accuracy}}}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from distill import evaluate
from distill.accounting import GpuLedger
from distill.prompts import embedded_prompts
from distill.rl import train as rl


def main() -> None:
    parser = argparse.ArgumentParser(description="RL learning-rate sweep on training prompts")
    parser.add_argument("--student", required=True, help="the shared off-policy checkpoint")
    parser.add_argument("--lrs", default="2e-4,5e-5,1e-5")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--window", type=int, default=40, help="steps averaged at each end")
    parser.add_argument("--check", type=int, default=64, help="training prompts checked greedily")
    parser.add_argument("--check-every", type=int, default=40)
    parser.add_argument("--n-prompts", type=int, default=1024, help="as the Table 21 --quick run")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/table21/rl_lr_sweep"))
    args = parser.parse_args()

    train_prompts = embedded_prompts(args.n_prompts, args.seed, "train")
    check = train_prompts[: args.check]  # training prompts: the objective's own data
    results: dict[str, dict[str, object]] = {}
    for lr in (float(x) for x in args.lrs.split(",")):
        run_dir = args.out / f"lr{lr:g}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        config = rl.Config(
            run_dir=run_dir,
            student=args.student,
            steps=args.steps,
            max_tokens=args.max_tokens,
            lr=lr,
            log_every=1,
            save_every=args.steps,
            eval_every=args.check_every,
            seed=args.seed,
        )
        eval_config = evaluate.Config(prompts=len(check), max_tokens=args.max_tokens, seed=1)
        rl.train(config, train_prompts, check, eval_config, GpuLedger())
        rows = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("phase") == "rl"
        ]
        rewards = [float(r["reward"]) for r in rows]
        evals = json.loads((run_dir / "eval.json").read_text())
        results[f"{lr:g}"] = {
            "reward_first": sum(rewards[: args.window]) / args.window,
            "reward_last": sum(rewards[-args.window :]) / args.window,
            "no_signal": sum(float(r["no_signal_groups"]) for r in rows) / len(rows),
            "greedy": evals,
        }
        r = results[f"{lr:g}"]
        print(
            f"lr {lr:g}: reward {r['reward_first']:.3f} -> {r['reward_last']:.3f} "
            f"(first/last {args.window} steps), no-signal groups {r['no_signal']:.2f}, "
            f"greedy on {len(check)} training prompts: "
            + "; ".join(
                f"{stage} " + " ".join(f"{m[9:]} {v:.2f}" for m, v in acc.items())
                for stage, acc in evals.items()
            ),
            flush=True,
        )
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
