"""LoRA vs full fine-tuning, off-policy, on the embedded pair: same teacher data, same steps.

    . .venv/bin/activate && python benchmarks/lora.py            # about 4-6 minutes on 2 CPU cores
    python benchmarks/lora.py --steps 20 --prompts 64              # a quick look

The embedded teacher (built once, cached under DISTILL_CACHE) answers `--prompts` training prompts
in both modes and 24 held-out prompts with its top-8 stored. The embedded student then trains
`--steps` off-policy steps of 16 sequences per variant: full fine-tuning at lr 3e-3 (the
`distill run` default) and LoRA rank 16 at 3e-3 and 1e-2 (adapters usually want a higher lr).
Per variant: trainable parameters, AdamW state and checkpoint bytes on disk, seconds per step,
held-out KL(teacher || student) on the top-8 + tail support before and after, and for LoRA the
largest |logit| difference between the merged checkpoint (loaded with from_pretrained) and the
wrapped model (base + saved adapters). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from distill import embedded, evaluate  # noqa: E402
from distill.accounting import GpuLedger  # noqa: E402
from distill.offpolicy import generate as gen  # noqa: E402
from distill.offpolicy import train as offpolicy  # noqa: E402
from distill.pipeline import heldout_examples  # noqa: E402
from distill.prompts import embedded_prompts  # noqa: E402
from students import lora  # noqa: E402
from teachers.hf import HFTeacher  # noqa: E402


def state_bytes(tensors: Any) -> int:
    """Bytes of every tensor nested in `tensors` (dicts and lists)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(state_bytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(state_bytes(v) for v in tensors)
    return 0


def merged_vs_wrapped(student: Path, ckpt: Path, rank: int, ids: torch.Tensor) -> float:
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)["lora"]["adapters"]
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    wrapped = lora.wrap(base, lora.Config(rank=rank)).eval()
    lora.load_adapter_state(wrapped, saved)
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return float((plain(input_ids=ids).logits - wrapped(input_ids=ids).logits).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=256)
    args = parser.parse_args()
    from cli import rerun_on_tcmalloc

    rerun_on_tcmalloc()  # on the allocator the `distill` command runs on (students/memory.py)
    assets = embedded.build(log=lambda s: print(s, flush=True))
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher)
    teacher = HFTeacher.from_pretrained(assets.teacher)
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    data = gen.Config(run_dir=root, max_tokens=48, seed=0)
    gen.generate(data, teacher, tokenizer, embedded_prompts(args.prompts, 0, "train"), GpuLedger())
    held = replace(data, output="eval_data", store_topk=8)
    gen.generate(held, teacher, tokenizer, embedded_prompts(24, 0, "eval"), GpuLedger())
    heldout = heldout_examples(root, "eval_data")

    def heldout_kl(model_dir: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return evaluate.heldout_kl(model, heldout, tokenizer)

    before = heldout_kl(assets.student)
    print(f"held-out KL before training: {before:.4f}", flush=True)
    ids = torch.tensor([[*heldout[0].prompt_ids, *heldout[0].response_ids]])  # (1, T)
    variants = {"full_lr3e-3": (0, 3e-3), "lora16_lr3e-3": (16, 3e-3), "lora16_lr1e-2": (16, 1e-2)}
    results: dict[str, dict[str, float]] = {}
    for name, (rank, lr) in variants.items():
        config = offpolicy.Config(
            run_dir=root / name,
            student=str(assets.student),
            data_dir=root / "teacher_data",
            steps=args.steps,
            batch_size=16,
            micro_batch_size=16,
            lr=lr,
            save_every=args.steps,
            lora_rank=rank,
        )
        t0 = time.perf_counter()
        summary = offpolicy.train(config, GpuLedger())
        seconds = time.perf_counter() - t0
        ckpt = summary.checkpoint
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        saved = state.get("lora", {}).get("adapters")  # LoRA: the only trained tensors
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        weights = saved.values() if saved else model.parameters()
        trainable = sum(t.numel() for t in weights)
        results[name] = {
            "trainable_params": trainable,
            "adam_state_bytes": state_bytes(state["optimizer"]["state"]),
            "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()),
            "seconds_per_step": seconds / args.steps,
            "final_loss": summary.final_loss,
            "heldout_kl": heldout_kl(ckpt),
        }
        if rank:
            results[name]["merged_vs_wrapped_max_abs_logit"] = merged_vs_wrapped(
                assets.student, ckpt, rank, ids
            )
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"steps": args.steps, "heldout_kl_before": before, "variants": results}))


if __name__ == "__main__":
    main()
