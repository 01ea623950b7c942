"""On-policy distillation step throughput: `distill onpolicy`'s loop vs TRL 1.16's GKDTrainer.

    python benchmarks/onpolicy_step.py                       # tiny Qwen3 pair built here, CPU
    python benchmarks/onpolicy_step.py --prompts 8 --g 2 --max-tokens 64 --steps 8 --threads 1

Same tiny teacher (4 layers) and student (2 layers), same prompts (thinking-mode chat prompts of
the embedded task), same G (TRL: each prompt repeated G times in the batch), same response length
(random-init models never emit eos, so every response is exactly --max-tokens long), same batch,
same sampling (T=1, no top-k/top-p), same learning rate, one optimizer step per batch, CPU. TRL
runs GKD with lmbda=1 (always on-policy) and beta=1 (reverse KL over the full vocabulary);
distill runs reverse KL on the teacher's top-k + tail support (--top-k) with the HF sampler.

Each side runs in its own process (so peak RSS is its own: `ru_maxrss`, imports included); the
first step is a warm-up and not timed. tokens/s = sampled response tokens / timed wall-clock of
the steps (sample + score + train + bookkeeping). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def build_pair(root: Path) -> None:
    from distill.tasks import corpus
    from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer

    tok = train_tokenizer(corpus(400, seed=0), vocab_size=500)
    save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-teacher"], tok, seed=1), tok, root / "teacher")
    save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-student"], tok, seed=2), tok, root / "student")


def run_distill(args: argparse.Namespace, root: Path) -> dict[str, float]:
    from distill.accounting import GpuLedger
    from distill.onpolicy import train as onpolicy
    from distill.prompts import embedded_prompts
    from teachers.hf import HFTeacher
    from teachers.protocol import SamplingParams

    pure = SamplingParams(temperature=1.0)  # T=1, no filters: what GKD samples with
    config = onpolicy.Config(
        run_dir=root / "distill_run",
        student=str(root / "student"),
        steps=args.steps,
        prompts_per_step=args.prompts,
        samples_per_prompt=args.g,
        micro_batch_size=args.prompts * args.g,
        modes=("think",),
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        divergence="reverse_kl",
        sampler="hf",
        lr=5e-4,
        warmup_steps=0,
        save_every=10**9,
        think_sampling=pure,
    )
    steps: list[dict[str, float]] = []
    prompts = embedded_prompts(args.prompts * args.steps, 0, "train")
    teacher = HFTeacher.from_pretrained(root / "teacher")
    onpolicy.train(config, teacher, prompts, GpuLedger(), lambda *a: steps.append(dict(a[3])))
    timed = steps[1:]
    seconds = sum(m["step_seconds"] for m in timed)
    tokens = sum(m["response_len_think"] * args.prompts * args.g for m in timed)
    return {"seconds": seconds, "tokens": tokens, "steps": len(timed)}


def run_trl(args: argparse.Namespace, root: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.prompts import embedded_prompts

    tok = AutoTokenizer.from_pretrained(root / "student")
    rows = [
        {"messages": [*p.messages, {"role": "assistant", "content": str(p.answer)}]}
        for p in embedded_prompts(args.prompts * args.steps, 0, "train")
        for _ in range(args.g)  # G samples of a prompt: the prompt G times in one batch
    ]
    config = GKDConfig(
        output_dir=str(root / "trl_run"),
        per_device_train_batch_size=args.prompts * args.g,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=5e-4,
        lmbda=1.0,
        beta=1.0,
        temperature=1.0,
        max_new_tokens=args.max_tokens,
        max_length=4096,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    marks: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: object, **k: object) -> None:
            marks.append(time.perf_counter())

    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(root / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(root / "teacher"),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Clock()],
    )
    generate = trainer.generate_on_policy_outputs

    def counted(model: object, inputs: dict[str, object], generation_config: object) -> object:
        ids, attention, labels = generate(model, inputs, generation_config)
        tokens.append(int((labels != -100).sum()))  # generated response tokens (up to eos)
        return ids, attention, labels

    trainer.generate_on_policy_outputs = counted  # type: ignore[method-assign]
    trainer.train()
    # Steps run back to back: step i is timed from its begin to the next step's begin.
    begins = marks[0::2]
    ends = marks[1::2]
    seconds = sum(e - b for b, e in zip(begins[1:], ends[1:], strict=True))
    return {"seconds": seconds, "tokens": float(sum(tokens[1:])), "steps": len(begins) - 1}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.root)
    result = run_distill(args, root) if args.side == "distill" else run_trl(args, root)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--g", type=int, default=2, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="steps per side; the first is warm-up")
    parser.add_argument("--top-k", type=int, default=16, help="distill's teacher top-k")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--side", choices=["distill", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        build_pair(Path(tmp))
        results = {}
        for side in ("distill", "trl"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--root", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    d, t = results["distill"], results["trl"]
    d_tps, t_tps = d["tokens"] / d["seconds"], t["tokens"] / t["seconds"]
    table = Table(title=f"on-policy step, P={args.prompts} G={args.g} L={args.max_tokens}, CPU")
    for col in ("", "steps/s", "tokens/s", "peak RSS MiB", "timed steps"):
        table.add_column(col)
    for name, r, tps in (("distill", d, d_tps), ("TRL GKD", t, t_tps)):
        table.add_row(name, f"{r['steps'] / r['seconds']:.2f}", f"{tps:.0f}",
                      f"{r['peak_rss_mib']:.0f}", str(r["steps"]))  # fmt: skip
    Console(stderr=True).print(table)
    print(json.dumps({
        "speedup_vs_trl": d_tps / t_tps,
        "distill_tokens_per_s": d_tps,
        "trl_tokens_per_s": t_tps,
        "distill_steps_per_s": d["steps"] / d["seconds"],
        "trl_steps_per_s": t["steps"] / t["seconds"],
        "distill_peak_rss_mib": d["peak_rss_mib"],
        "trl_peak_rss_mib": t["peak_rss_mib"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
