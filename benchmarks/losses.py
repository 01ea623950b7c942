"""Distillation-loss benchmark: naive full logits vs TRL vs Liger vs distill's chunked path.

    . .venv/bin/activate && pip install "trl==1.16.*" && pip install liger-kernel --no-deps
    python benchmarks/losses.py --quick     # N = 2048 only, about 10 minutes on 2 CPU cores
    python benchmarks/losses.py             # N in 1024..8192, about 15 minutes

Every contestant runs generalized JSD(β=0.5) (TRL's and Liger's convention) over V = 151,936
with H = 1,024 and bf16 matmuls, forward + backward, each configuration in its own process so
its peak RSS (ru_maxrss) is clean. Groups compare like with like:
- hidden: student and teacher hidden states + lm_heads: naive, Liger chunked JSD, distill, and
  distill with `exact_logits` (N = 2048 only);
- logits: student hidden + lm_head, teacher (N, V) bf16 logits: naive, TRL, distill;
- topk: student hidden + lm_head, teacher top-64 ids/log-probs: naive, distill (TRL and
  Liger take no top-k data).
Every process runs with the same `torch.set_num_threads(--threads)`. distill runs with
compile=True (on CPU: the C++ kernel of `losses.native` for the dense forms, torch.compile for
top-k) and keeps a `losses.Workspace` across steps, as the training loops do. Peak RSS
comes from the one-process-per-configuration runs; their step times go into the naive/TRL
ratios. The Liger ratios come from a paired run instead: Liger, distill and distill with exact
logits alternate step by step in one process, so a load spike on the shared machine hits all of
them; `speed_ratio_vs_liger[_exact_logits]` is the median over rounds of Liger's time / distill's.

Precision: both references are the same loss in fp64 arithmetic, computed chunk by chunk here
from the same bf16 hidden states and lm_heads:
- `rel_err_vs_fp32`: from fp32 matmuls of those bf16 inputs (exact products, fp32 accumulation):
  the end-to-end error of a bf16-input kernel, the issue's goal (<= 1e-5);
- `rel_err_vs_fp32_same_bf16_logits`: from the bf16-rounded logits a bf16 matmul returns on CPU:
  the error of everything after the matmul (softmax, divergence, reductions).
Their gap is the rounding of the logits to bf16 (2^-9 relative). `matmul_out` says which logits
distill's matmuls produced here ("fp32" where a bf16-in/fp32-out matmul exists: CUDA; "bf16" on
CPU, where PyTorch has none). `rel_err_vs_fp32_exact_logits` is the first error again with
`exact_logits=True`, which on CPU rebuilds fp32-accurate logits from a second, residual bf16
matmul per side (`losses.logits.logits_into`); its cost is in the exact-logits Liger ratio.
The last stdout line is JSON.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `losses` package: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V, H, K, BETA = 151_936, 1_024, 64, 0.5
NAIVE_COPIES = 12  # measured: naive peaks near 12 fp32 copies of the (N, V) logits here
NAIVE_LIMIT_GB = 16.0  # shared 24 GiB machine: skip naive above this estimate
CONTESTANTS = {
    "hidden": ["naive", "liger", "distill", "distill_exact"],
    "logits": ["naive", "trl", "distill"],
    "topk": ["naive", "distill"],
}


def inputs(n: int, group: str) -> dict[str, torch.Tensor]:
    """Seeded bf16 inputs; generated in place so no fp32 temporaries inflate the peak."""
    g = torch.Generator().manual_seed(0)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16).normal_(0, std, generator=g)

    x = {"hs": normal(n, H, std=1.0), "ws": normal(V, H, std=3 / H**0.5)}
    # The teacher is the student plus noise: a realistic JSD of a few tenths of a nat.
    ht = x["hs"] + normal(n, H, std=0.5)
    wt = x["ws"] + normal(V, H, std=1.5 / H**0.5)
    if group == "hidden":
        x |= {"ht": ht, "wt": wt}
    elif group == "logits":
        x["zt"] = ht @ wt.T  # (N, V) bf16, an input like any other
    else:
        ids, lps = [], []
        for start in range(0, n, 256):  # top-k built chunk by chunk
            logp = torch.log_softmax((ht[start : start + 256] @ wt.T).float(), -1)
            top = logp.topk(K, dim=-1)
            ids.append(top.indices)
            lps.append(top.values)
        x |= {"ids": torch.cat(ids), "lp": torch.cat(lps)}
    return x


def step_fn(
    name: str, group: str, x: dict[str, torch.Tensor], chunk: int, compile: bool = True
) -> Callable[[], float]:
    """A closure running forward + backward once and returning the loss (mean over tokens)."""
    from losses import (
        TeacherHidden,
        TeacherLogits,
        TeacherTopK,
        Workspace,
        dense_support,
        divergence,
        fused_linear_divergence_sum,
        topk_support,
    )

    hs, ws = x["hs"].requires_grad_(), x["ws"].requires_grad_()
    n = hs.shape[0]

    def done(loss: torch.Tensor) -> float:
        loss.backward()
        hs.grad, ws.grad = None, None
        return loss.item()

    if name in ("distill", "distill_exact"):
        teacher = {
            "hidden": lambda: TeacherHidden(x["ht"], x["wt"]),
            "logits": lambda: TeacherLogits(x["zt"]),
            "topk": lambda: TeacherTopK(x["ids"], x["lp"]),
        }[group]()
        weight = torch.full((n,), 1.0 / n)  # the loop's mask / n_tokens
        workspace = Workspace()  # chunk buffers kept between steps, as a training loop keeps them

        def distill() -> float:
            loss, _ = fused_linear_divergence_sum(
                hs, ws, teacher, "jsd", weight, vocab_size=V, beta=BETA, chunk_size=chunk,
                compile=compile, exact_logits=name == "distill_exact", workspace=workspace,
            )  # fmt: skip
            return done(loss)

        return distill
    if name == "naive":

        def naive() -> float:
            zs = hs @ ws.T  # (N, V) bf16
            if group == "topk":
                sup = topk_support(zs, x["ids"], x["lp"], V)
            else:
                with torch.no_grad():
                    zt = x["ht"] @ x["wt"].T if group == "hidden" else x["zt"]
                sup = dense_support(zs, zt, V)
            return done(divergence("jsd", *sup, beta=BETA).mean())

        return naive
    if name == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        labels = torch.zeros(1, n, dtype=torch.long)  # no -100: every token counts

        def trl() -> float:
            zs = (hs @ ws.T).unsqueeze(0)  # (1, N, V) bf16, as a model's logits
            loss = GKDTrainer.generalized_jsd_loss(zs, x["zt"].unsqueeze(0), labels, beta=BETA)
            return done(loss)

        return trl
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    liger_loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA)
    labels = torch.zeros(n, dtype=torch.long)

    def liger() -> float:
        return done(liger_loss(hs, ws, x["ht"], x["wt"], labels))

    return liger


def reference(n: int) -> dict[str, float]:
    """JSD(0.5) mean over tokens in fp64 math: from fp32 matmuls and from bf16-matmul logits."""
    x = inputs(n, "hidden")
    out = {}
    for label, cast in (("fp32", torch.float32), ("bf16_logits", torch.bfloat16)):
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, 128):
            rows = slice(start, start + 128)
            zs = (x["hs"][rows].to(cast) @ x["ws"].to(cast).T).double()
            zt = (x["ht"][rows].to(cast) @ x["wt"].to(cast).T).double()
            q, p = torch.softmax(zs, -1), torch.softmax(zt, -1)
            m = 0.5 * (p + q)
            kl_p = (p * (p.log() - m.log())).nan_to_num().sum(-1)
            kl_q = (q * (q.log() - m.log())).nan_to_num().sum(-1)
            total += (0.5 * kl_p + 0.5 * kl_q).sum()
        out[label] = (total / n).item()
    return out


def paired(n: int, rounds: int, chunk: int) -> dict[str, object]:
    """Liger, distill and distill with exact logits alternating in one process (hidden group)."""
    names = ("liger", "distill", "distill_exact")
    steps = {name: step_fn(name, "hidden", inputs(n, "hidden"), chunk) for name in names}
    for step in steps.values():
        step()  # warm-up: compilation, first-touch allocations
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    def ratio(name: str) -> float:
        return statistics.median(lg / d for lg, d in zip(times["liger"], times[name], strict=True))

    return {
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "speed_ratio_vs_liger": ratio("distill"),
        "speed_ratio_vs_liger_exact_logits": ratio("distill_exact"),
        "times": times,
    }


def run_one(name: str, group: str, n: int, steps: int, chunk: int) -> dict[str, object]:
    torch.manual_seed(0)
    if name == "reference":
        return {"reference": reference(n), "peak_rss_gb": _rss_gb()}
    if name == "paired":
        return paired(n, steps, chunk)
    step = step_fn(name, group, inputs(n, group), chunk)
    loss = step()  # warm-up: compilation, first-touch allocations
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "loss": loss, "peak_rss_gb": _rss_gb()}


def _round(value: object) -> float | None:
    return round(float(value), 3) if isinstance(value, int | float) else None


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(name: str, group: str, n: int, steps: int, chunk: int, threads: int) -> dict[str, object]:
    """Run one configuration in a fresh process; its last stdout line is its JSON."""
    cmd = [sys.executable, __file__, "--one", name, "--group", group, "--n", str(n)]
    cmd += ["--steps", str(steps), "--chunk", str(chunk), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 2048 only")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="hidden", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--chunk", type=int, default=256, help="distill's chunk size (rows)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the paired Liger run")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every process"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.group, args.n, args.steps, args.chunk)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    sizes = [2048] if args.quick else [1024, 2048, 4096, 8192]
    rows: dict[tuple[str, str, int], dict[str, object]] = {}
    for n in sizes:
        groups = ["hidden", "logits", "topk"] if n == 2048 else ["hidden"]
        steps = args.steps if n <= 2048 else max(1, args.steps - 1)
        for group in groups:
            for name in CONTESTANTS[group]:
                if name == "distill_exact" and n != 2048:
                    continue
                naive_gb = NAIVE_COPIES * n * V * 4 / 2**30
                if name in ("naive", "trl") and naive_gb > NAIVE_LIMIT_GB:
                    rows[(group, name, n)] = {"error": f"skipped: needs ~{naive_gb:.0f} GB"}
                    continue
                console.print(f"[dim]running {group}/{name} N={n}[/dim]")
                rows[(group, name, n)] = child(name, group, n, steps, args.chunk, args.threads)
                console.print(f"[dim]  {rows[(group, name, n)]}[/dim]")
    ref = child("reference", "hidden", 2048, 0, args.chunk, args.threads)["reference"]
    assert isinstance(ref, dict)
    console.print(
        f"[dim]running paired liger/distill/distill_exact N=2048, {args.rounds} rounds[/dim]"
    )
    pair = child("paired", "hidden", 2048, args.rounds, args.chunk, args.threads)
    console.print(f"[dim]  {pair}[/dim]")

    table = Table(title=f"JSD(β={BETA}) forward+backward, V={V:,}, H={H:,}, bf16 matmuls")
    for col in ("group", "contestant", "N", "peak RSS GB", "median step s", "loss"):
        table.add_column(col, justify="right")
    for (group, name, n), r in rows.items():
        if "error" in r:
            table.add_row(group, name, str(n), "-", "-", str(r["error"]))
            continue
        rss, sec, loss = r["peak_rss_gb"], r["median_s"], r["loss"]
        table.add_row(group, name, str(n), f"{rss:.2f}", f"{sec:.2f}", f"{loss:.6f}")
    console.print(table)
    console.print(f"reference JSD at N=2048: {ref}")
    from losses.logits import matmul_out_dtype

    logits_dtype = matmul_out_dtype(torch.zeros(1, dtype=torch.bfloat16))

    def ratio(group: str, other: str, key: str, mine: str = "distill") -> float | None:
        a, b = rows.get((group, other, 2048), {}), rows.get((group, mine, 2048), {})
        if key not in a or key not in b:
            return None
        return round(float(a[key]) / float(b[key]), 3)  # type: ignore[arg-type]

    distill = rows[("hidden", "distill", 2048)]
    loss = float(distill["loss"])  # type: ignore[arg-type]
    exact = rows.get(("hidden", "distill_exact", 2048), {})
    exact_loss = float(exact["loss"]) if "loss" in exact else None  # type: ignore[arg-type]
    flat = [float(rows[("hidden", "distill", n)]["peak_rss_gb"]) for n in sizes  # type: ignore[arg-type]
            if "peak_rss_gb" in rows[("hidden", "distill", n)]]  # fmt: skip
    summary = {
        "n": 2048,
        "mem_ratio_vs_naive": ratio("hidden", "naive", "peak_rss_gb"),
        "speed_ratio_vs_naive": ratio("hidden", "naive", "median_s"),
        "speed_ratio_vs_liger": _round(pair.get("speed_ratio_vs_liger")),
        "speed_ratio_vs_liger_separate_processes": ratio("hidden", "liger", "median_s"),
        "speed_ratio_vs_liger_exact_logits": _round(pair.get("speed_ratio_vs_liger_exact_logits")),
        "threads": args.threads,
        "matmul_out": "fp32" if logits_dtype == torch.float32 else "bf16",
        "rel_err_vs_fp32": abs(loss - ref["fp32"]) / ref["fp32"],
        "rel_err_vs_fp32_same_bf16_logits": abs(loss - ref["bf16_logits"]) / ref["bf16_logits"],
        "rel_err_vs_fp32_exact_logits": (
            abs(exact_loss - ref["fp32"]) / ref["fp32"] if exact_loss is not None else None
        ),
        "exact_logits_mem_ratio_vs_naive": ratio("hidden", "naive", "peak_rss_gb", "distill_exact"),
        "mem_spread_1024_8192": round(max(flat) / min(flat) - 1, 4) if len(flat) > 1 else None,
        "logits_mem_ratio_vs_naive": ratio("logits", "naive", "peak_rss_gb"),
        "logits_speed_ratio_vs_naive": ratio("logits", "naive", "median_s"),
        "logits_speed_ratio_vs_trl": ratio("logits", "trl", "median_s"),
        "logits_mem_ratio_vs_trl": ratio("logits", "trl", "peak_rss_gb"),
        "topk_mem_ratio_vs_naive": ratio("topk", "naive", "peak_rss_gb"),
        "topk_speed_ratio_vs_naive": ratio("topk", "naive", "median_s"),
        "distill_peak_rss_gb": distill["peak_rss_gb"],
        "distill_step_s": distill["median_s"],
        "paired_median_s": pair.get("median_s"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
