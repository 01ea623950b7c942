"""On-policy training step, fused-linear loss vs full logits, with a head as wide as Qwen3's.

    python benchmarks/fused_step.py                  # CPU: ~3 minutes on 2 shared cores
    python benchmarks/fused_step.py --batch 4 --tokens 256 --rounds 2

A tiny Qwen3 (2 layers, hidden 1,024, 16/8 heads of 128) with Qwen3's 151,936-row tied head
(151,669 real ids): the head is 156M of the 186M parameters, as it dominates Qwen3-0.6B's step.
The step is the loop's `student.train` micro-batch: forward, reverse KL on a random teacher
top-k (K=16) over the response tokens (the second half of each row), the diagnostics, backward;
exactly what `distill/onpolicy/train.py` runs on each path (`fused_step.topk_loss` vs the model's
logits + `objective.topk_divergence` + `metrics.accumulate`). Sampling, scoring and the optimizer
are the same on both paths and left out.

Peak memory: CUDA, `max_memory_allocated` in this process; CPU, one subprocess per path, peak
RSS (`ru_maxrss`) minus the RSS before its first step. Time: both paths alternate step by step
in one process (the machine is shared: a load spike then hits both), median over rounds after
one warm-up each. fp32 on CPU (what the loops train in there), bf16 on CUDA. Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

VOCAB_ROWS, VOCAB = 151_936, 151_669  # Qwen3: head rows, tokenizer ids


def build(args: argparse.Namespace):  # noqa: ANN201  (model, batch, measured)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from distill.batch import Example, collate
    from teachers.protocol import TopK

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB_ROWS, hidden_size=1024, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    )  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_default_dtype(dtype)  # parameters born in the training dtype
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.train()
    g = torch.Generator().manual_seed(0)
    T, R, K = args.tokens, args.tokens // 2, 16
    examples = []
    for _ in range(args.batch):
        ids = torch.randint(0, VOCAB, (T,), generator=g).tolist()
        t_ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(R)])  # (R, K)
        t_lp = torch.log_softmax(torch.randn(R, K, generator=g), -1) - 0.1  # (R, K), 0.9 mass
        topk = TopK(
            ids=t_ids.int().numpy(), logprobs=t_lp.numpy(), actual_logprobs=t_lp[:, 0].numpy()
        )
        train = torch.ones(R, dtype=torch.bool).numpy()
        examples.append(
            Example(prompt_ids=ids[: T - R], response_ids=ids[T - R :], train=train, topk=topk)
        )
    batch = collate(examples, pad_id=0).to(model.device)
    measured = batch.loss_mask.clone()
    return model, batch, measured


def step(model, batch, measured, fused: bool) -> float:  # noqa: ANN001
    from distill.fused_step import topk_loss
    from distill.objective import topk_divergence
    from distill.onpolicy.metrics import Diagnostics, accumulate

    n_tokens, diag = float(batch.n_targets), Diagnostics()
    if fused:
        share, _ = topk_loss(model, model.lm_head.weight, batch, n_tokens, "reverse_kl", VOCAB,
                             measured=measured, diag=diag)  # fmt: skip
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_token, _ = topk_divergence(logits, batch, "reverse_kl", VOCAB)
        share = per_token.sum() / n_tokens
        accumulate(diag, logits, batch, measured, VOCAB)
    share.backward()
    model.zero_grad(set_to_none=True)
    return float(share.detach())


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def memory_child(args: argparse.Namespace) -> None:
    """One path, one step, in a fresh process: peak RSS above the RSS before the step."""
    torch.set_num_threads(args.threads)
    model, batch, measured = build(args)
    before = rss_gb()
    loss = step(model, batch, measured, args.child == "fused")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"step_peak_gb": peak - before, "peak_rss_gb": peak, "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["fused", "logits"])
    args = parser.parse_args()
    if args.child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    memory: dict[str, float] = {}
    losses: dict[str, float] = {}
    if not cuda:
        for path in ("fused", "logits"):
            cmd = [sys.executable, __file__, "--child", path, "--batch", str(args.batch),
                   "--tokens", str(args.tokens), "--threads", str(args.threads)]  # fmt: skip
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                             .stdout.strip().splitlines()[-1])  # fmt: skip
            memory[path], losses[path] = out["step_peak_gb"], out["loss"]
    model, batch, measured = build(args)
    times: dict[str, list[float]] = {"fused": [], "logits": []}
    base = 0
    for r in range(args.rounds + 1):  # round 0 warms both paths up
        for path in ("fused", "logits") if r % 2 == 0 else ("logits", "fused"):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            losses[path] = step(model, batch, measured, path == "fused")
            if cuda:
                torch.cuda.synchronize()
                memory[path] = (torch.cuda.max_memory_allocated() - base) / 2**30
            if r > 0:
                times[path].append(time.perf_counter() - t0)
    sec = {p: statistics.median(v) for p, v in times.items()}
    print(f"{'path':<8}{'step peak GB':>14}{'step s':>10}{'loss':>12}")
    for p in ("fused", "logits"):
        print(f"{p:<8}{memory[p]:>14.2f}{sec[p]:>10.2f}{losses[p]:>12.6f}")
    result = {
        "device": "cuda" if cuda else "cpu",
        "batch": args.batch,
        "tokens": args.tokens,
        "vocab_rows": VOCAB_ROWS,
        "fused_step_peak_gb": round(memory["fused"], 3),
        "logits_step_peak_gb": round(memory["logits"], 3),
        "memory_ratio_logits_over_fused": round(memory["logits"] / memory["fused"], 2),
        "fused_step_s": round(sec["fused"], 3),
        "logits_step_s": round(sec["logits"], 3),
        "speed_ratio_logits_over_fused": round(sec["logits"] / sec["fused"], 2),
        "loss_rel_diff": abs(losses["fused"] - losses["logits"]) / abs(losses["logits"]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
