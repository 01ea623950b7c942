"""On-policy training step, fused-linear loss vs full logits, with a head as wide as Qwen3's.

    python benchmarks/fused_step.py                  # CPU: ~4 minutes on 2 shared cores
    python benchmarks/fused_step.py --batch 4 --tokens 256 --rounds 2

A tiny Qwen3 (2 layers, hidden 1,024, 16/8 heads of 128) with Qwen3's 151,936-row tied head
(151,669 real ids): the head is 156M of the 186M parameters, as it dominates Qwen3-0.6B's step.
The step is the loop's `student.train` micro-batch: forward, reverse KL on a random teacher
top-k (K=16) over the response tokens (the second half of each row), the diagnostics, backward.
Three paths, so that fusion and row selection are measured apart:
- `fused`: what `distill/onpolicy/train.py` runs (`fused_loss.topk_loss`), with one
  `losses.Workspace` kept across steps as the loop keeps it;
- `logits_rows` (the fair baseline): the same backbone, then full (N, V) logits of the response
  rows only (the rows the fused path projects) + `topk_support`/`divergence` + the diagnostics;
- `logits_all` (the old baseline, what `--no-fused-loss` runs): the model's (B, T, V) logits at
  every position, prompt included, + `objective.topk_divergence` + `metrics.accumulate`.
Sampling, scoring and the optimizer are the same on every path and left out.

Peak memory: CUDA, `max_memory_allocated` in this process; CPU, one subprocess per path, peak
RSS (`ru_maxrss`) minus the RSS before its first step. Time: the paths alternate step by step in
one process, their order rotating every round (the machine is shared: a load spike then hits
all), median over rounds after one warm-up each. fp32 on CPU (what the loops train in there),
bf16 on CUDA. Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
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


PATHS = ("fused", "logits_rows", "logits_all")


def step(model, batch, measured, path: str, workspace=None) -> float:  # noqa: ANN001
    from distill.batch import next_token_view
    from distill.fused_loss import last_hidden, topk_loss
    from distill.logits_loss import topk_divergence
    from distill.onpolicy.metrics import Diagnostics, accumulate, accumulate_rows
    from losses import DivergenceSpec, divergence, topk_support

    RKL = DivergenceSpec("reverse_kl")  # noqa: N806

    n_tokens, diag = float(batch.n_targets), Diagnostics()
    if path == "fused":
        observe = partial(accumulate_rows, diag, vocab_size=VOCAB)  # as the loop's micro_batch_loss
        share, _ = topk_loss(model, model.lm_head.weight, batch, n_tokens, RKL, VOCAB,
                             measured=measured, observe=observe, workspace=workspace)  # fmt: skip
    elif path == "logits_rows":
        h, _, mask, t_ids, t_lp = next_token_view(last_hidden(model, batch), batch)  # (B, T-1, H)
        assert t_ids is not None and t_lp is not None
        rows = mask | measured[:, 1:]  # (B, T-1): the rows the fused path projects
        logits = h[rows] @ model.lm_head.weight.T  # (N, V): response rows only
        ids, lp, weight = t_ids[rows], t_lp[rows], mask[rows].float()
        per_token = divergence("reverse_kl", *topk_support(logits, ids, lp, VOCAB))  # (N,)
        share = (per_token * weight).sum() / n_tokens
        accumulate_rows(diag, logits.detach(), ids, lp, measured[:, 1:][rows], VOCAB)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_token, _ = topk_divergence(logits, batch, RKL, VOCAB)
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
    from losses import Workspace

    loss = step(model, batch, measured, args.child, Workspace())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"step_peak_gb": peak - before, "peak_rss_gb": peak, "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=PATHS)
    args = parser.parse_args()
    if args.child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    memory: dict[str, float] = {}
    losses: dict[str, float] = {}
    if not cuda:
        for path in PATHS:
            cmd = [sys.executable, __file__, "--child", path, "--batch", str(args.batch),
                   "--tokens", str(args.tokens), "--threads", str(args.threads)]  # fmt: skip
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                             .stdout.strip().splitlines()[-1])  # fmt: skip
            memory[path], losses[path] = out["step_peak_gb"], out["loss"]
    from losses import Workspace

    model, batch, measured = build(args)
    workspace = Workspace()  # kept across steps, as the loop keeps its head's
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    base = 0
    for r in range(args.rounds + 1):  # round 0 warms every path up
        for path in PATHS[r % 3 :] + PATHS[: r % 3]:  # the order rotates every round
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            losses[path] = step(model, batch, measured, path, workspace)
            if cuda:
                torch.cuda.synchronize()
                memory[path] = (torch.cuda.max_memory_allocated() - base) / 2**30
            if r > 0:
                times[path].append(time.perf_counter() - t0)
    sec = {p: statistics.median(v) for p, v in times.items()}
    print(f"{'path':<12}{'step peak GB':>14}{'step s':>10}{'loss':>12}")
    for p in PATHS:
        print(f"{p:<12}{memory[p]:>14.2f}{sec[p]:>10.2f}{losses[p]:>12.6f}")

    def paired(other: str) -> float:  # median over rounds of the per-round ratio
        return statistics.median(o / f for o, f in zip(times[other], times["fused"], strict=True))

    result = {
        "device": "cuda" if cuda else "cpu",
        "batch": args.batch,
        "tokens": args.tokens,
        "response_tokens": args.tokens // 2,
        "vocab_rows": VOCAB_ROWS,
        "rounds": args.rounds,
        "step_peak_gb": {p: round(memory[p], 3) for p in PATHS},
        "step_s": {p: round(sec[p], 3) for p in PATHS},
        "memory_ratio_rows_over_fused": round(memory["logits_rows"] / memory["fused"], 2),
        "speed_ratio_rows_over_fused": round(paired("logits_rows"), 2),
        "memory_ratio_all_over_fused": round(memory["logits_all"] / memory["fused"], 2),
        "speed_ratio_all_over_fused": round(paired("logits_all"), 2),
        "loss_rel_diff_rows": abs(losses["fused"] - losses["logits_rows"])
        / abs(losses["logits_rows"]),
        "loss_rel_diff_all": abs(losses["fused"] - losses["logits_all"])
        / abs(losses["logits_all"]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
