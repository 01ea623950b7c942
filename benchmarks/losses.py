"""Distillation-loss benchmark: naive full logits vs TRL vs Liger vs distill's chunked path.

    pip install -e ".[bench]"               # trl>=1.16, liger-kernel
    python benchmarks/losses.py --quick     # N = 2048 only, about 15 minutes on 2 CPU cores
    python benchmarks/losses.py             # N in 1024..8192, about 20 minutes

Every contestant runs generalized JSD(β=0.5) (TRL's and Liger's convention) over V = 151,936
with H = 1,024 and bf16 matmuls, forward + backward, each configuration in its own process so
its peak RSS (ru_maxrss) is clean. Groups compare like with like:
- hidden: student and teacher hidden states + lm_heads: naive, Liger chunked JSD, distill, and
  distill with bf16 logits (MKL's fp32-out GEMM switched off, N = 2048 only);
- logits: student hidden + lm_head, teacher (N, V) bf16 logits: naive, TRL, distill;
- topk: student hidden + lm_head, teacher top-64 ids/log-probs: naive, distill (TRL and
  Liger take no top-k data).
Every process runs with the same `torch.set_num_threads(--threads)`. distill runs with
compile=True (on CPU: the C++ kernel of `losses.native` for the dense forms, torch.compile for
top-k) and keeps a `losses.Workspace` across steps, as the training loops do.

Memory: peak RSS of one process per configuration (also the N = 1k-8k scan of the full run).
Speed: paired runs, where a group's contestants alternate step by step in one process on the
same inputs, the order rotating every round (round r starts with contestant r mod k), so a load
spike on the shared machine hits all of them and none always runs first; a ratio is the median
over rounds of the per-round ratio. Two paired runs: hidden (Liger, distill, distill with bf16
logits; --rounds) and logits (naive, TRL, distill; --logits-rounds). The
separate-process step times are printed too, labelled so.

Precision: each contestant's loss against the same loss in fp64 arithmetic (`reference`),
computed chunk by chunk here from the same bf16 inputs: hidden, from fp32 matmuls of the bf16
hidden states and lm_heads (exact products, fp32 accumulation): the end-to-end error of a
bf16-input kernel, which the goal (<= 1e-5) is about; logits, the student's logits from an
fp32 matmul and the teacher's bf16 logits as given; topk, the student's from an fp32 matmul on
the teacher's top-k + tail support. `rel_err_vs_fp32_same_bf16_logits` compares distill with the
reference built from the bf16-rounded logits a CPU matmul returns: the error of everything after
the matmul. `matmul_out` says which logits distill's matmuls produced here ("fp32" where a
bf16-in/fp32-out matmul exists: CUDA, and CPU through MKL's `cblas_gemm_bf16bf16f32`, which
PyTorch's x86 builds carry: `losses.logits`; "bf16" otherwise). `distill_bf16_logits` is distill
with that GEMM switched off: every logit rounded to bf16, the CPU default before it (the cost of
exact logits, measured). `vs_liger` gives, per distill configuration, its paired speed ratio
against Liger next to its own error: the goal asks for both in one configuration.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `losses` package: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from losses.fused import CHUNK_ROWS  # noqa: E402

V, H, K, BETA = 151_936, 1_024, 64, 0.5
NAIVE_COPIES = 12  # measured: naive peaks near 12 fp32 copies of the (N, V) logits here
NAIVE_LIMIT_GB = 16.0  # shared 24 GiB machine: skip naive above this estimate
CONTESTANTS = {
    "hidden": ["naive", "liger", "distill", "distill_bf16_logits"],
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

    if name in ("distill", "distill_bf16_logits"):
        teacher = {
            "hidden": lambda: TeacherHidden(x["ht"], x["wt"]),
            "logits": lambda: TeacherLogits(x["zt"]),
            "topk": lambda: TeacherTopK(x["ids"], x["lp"]),
        }[group]()
        weight = torch.full((n,), 1.0 / n)  # the loop's mask / n_tokens
        workspace = Workspace()  # chunk buffers kept between steps, as a training loop keeps them

        def distill() -> float:
            with bf16_logits() if name == "distill_bf16_logits" else nullcontext():
                loss, _ = fused_linear_divergence_sum(
                    hs, ws, teacher, "jsd", weight, vocab_size=V, beta=BETA, chunk_size=chunk,
                    compile=compile, workspace=workspace,
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


@contextmanager
def bf16_logits() -> Iterator[None]:
    """distill without MKL's fp32-out GEMM, as on a CPU PyTorch without MKL: bf16 logits."""
    from losses import logits

    gemm = logits._mkl_gemm
    logits._mkl_gemm = lambda dtype: None  # type: ignore[assignment]
    try:
        yield
    finally:
        logits._mkl_gemm = gemm


def jsd64(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """JSD(0.5) per row in fp64 from (C, V) student and teacher logits, written out by hand."""
    q, p = torch.softmax(zs.double(), -1), torch.softmax(zt.double(), -1)
    m = 0.5 * (p + q)
    kl_p = (p * (p.log() - m.log())).nan_to_num().sum(-1)
    kl_q = (q * (q.log() - m.log())).nan_to_num().sum(-1)
    return 0.5 * kl_p + 0.5 * kl_q


def reference(n: int) -> dict[str, float]:
    """Each group's loss (mean over tokens) in fp64 math from the same bf16 inputs.

    hidden: `fp32`, both sides' logits from fp32 matmuls of the bf16 inputs (exact products);
    `bf16_logits`, from the bf16-rounded logits a CPU bf16 matmul returns. logits: the student's
    logits from an fp32 matmul, the teacher's bf16 logits as given. topk: the student's from an
    fp32 matmul over the teacher's top-k + tail support (`losses.topk_support` in fp64).
    """
    from losses import divergence, topk_support

    x = inputs(n, "hidden") | inputs(n, "logits") | inputs(n, "topk")
    ws, wt = x["ws"].float(), x["wt"].float()  # (V, H) fp32: bf16 values, exactly
    total = {"fp32": 0.0, "bf16_logits": 0.0, "logits": 0.0, "topk": 0.0}
    for start in range(0, n, 128):
        rows = slice(start, start + 128)
        zs = x["hs"][rows].float() @ ws.T  # (C, V), exact products, fp32 accumulation
        zt = x["ht"][rows].float() @ wt.T
        total["fp32"] += float(jsd64(zs, zt).sum())
        total["logits"] += float(jsd64(zs, x["zt"][rows]).sum())
        sup = topk_support(zs.double(), x["ids"][rows], x["lp"][rows].double(), V)
        total["topk"] += float(divergence("jsd", *sup, beta=BETA).sum())
        zs16 = x["hs"][rows] @ x["ws"].T  # (C, V) bf16, as a CPU bf16 matmul returns them
        total["bf16_logits"] += float(jsd64(zs16, x["ht"][rows] @ x["wt"].T).sum())
    return {k: v / n for k, v in total.items()}


PAIRED = {
    "hidden": ("liger", "distill", "distill_bf16_logits"),
    "logits": ("naive", "trl", "distill"),
}


def paired(group: str, n: int, rounds: int, chunk: int) -> dict[str, object]:
    """One group's contestants alternating step by step in one process, on the same inputs.

    The order rotates every round (round r starts with contestant r mod k), so no contestant
    always runs first after the others (cache, allocator and frequency effects).
    """
    names = PAIRED[group]
    x = inputs(n, group)
    steps = {name: step_fn(name, group, x, chunk) for name in names}
    loss = {name: step() for name, step in steps.items()}  # warm-up: compilation, first touches
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            loss[name] = steps[name]()
            times[name].append(time.perf_counter() - start)

    def ratio(slow: str, fast: str) -> float:  # median over rounds of the per-round ratio
        return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))

    pairs = [(names[0], name) for name in names[1:]]
    if group == "logits":
        pairs.append(("trl", "distill"))
    return {
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "loss": loss,
        "ratios": {f"{a}_over_{b}": ratio(a, b) for a, b in pairs},
        "times": times,
    }


def run_one(name: str, group: str, n: int, steps: int, chunk: int) -> dict[str, object]:
    torch.manual_seed(0)
    if name == "reference":
        return {"reference": reference(n), "peak_rss_gb": _rss_gb()}
    if name == "paired":
        return paired(group, n, steps, chunk)
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
    parser.add_argument(
        "--chunk", type=int, default=CHUNK_ROWS, help="distill's chunk size (rows; its default)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the paired Liger run")
    parser.add_argument(
        "--logits-rounds", type=int, default=3, help="rounds of the paired naive/TRL run"
    )
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
                if name == "distill_bf16_logits" and n != 2048:
                    continue
                naive_gb = NAIVE_COPIES * n * V * 4 / 2**30
                if name in ("naive", "trl") and naive_gb > NAIVE_LIMIT_GB:
                    rows[(group, name, n)] = {"error": f"skipped: needs ~{naive_gb:.0f} GB"}
                    continue
                console.print(f"[dim]running {group}/{name} N={n}[/dim]")
                rows[(group, name, n)] = child(name, group, n, steps, args.chunk, args.threads)
                console.print(f"[dim]  {rows[(group, name, n)]}[/dim]")
    ref = child("reference", "hidden", 2048, 0, args.chunk, args.threads)["reference"]
    assert isinstance(ref, dict), ref
    pair: dict[str, dict[str, Any]] = {}
    for group, rounds in (("hidden", args.rounds), ("logits", args.logits_rounds)):
        console.print(
            f"[dim]running paired {'/'.join(PAIRED[group])} N=2048, {rounds} rounds[/dim]"
        )
        pair[group] = child("paired", group, 2048, rounds, args.chunk, args.threads)
        console.print(f"[dim]  {pair[group]}[/dim]")

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
    console.print(f"references (fp64) at N=2048: {ref}")
    from losses.logits import matmul_out_dtype

    logits_dtype = matmul_out_dtype(torch.zeros(1, dtype=torch.bfloat16))

    def ratio(group: str, other: str, key: str, mine: str = "distill") -> float | None:
        a, b = rows.get((group, other, 2048), {}), rows.get((group, mine, 2048), {})
        if key not in a or key not in b:
            return None
        return round(float(a[key]) / float(b[key]), 3)  # type: ignore[arg-type]

    def err(loss: object, reference: float) -> float | None:
        return abs(float(loss) - reference) / reference if isinstance(loss, float) else None

    # Each contestant: its paired median step time next to its error against the fp64 reference
    # of its own group (hidden: fp32-matmul logits; logits: the given bf16 teacher logits).
    contestants: dict[str, dict[str, dict[str, float | None]]] = {}
    for group in PAIRED:
        p = pair[group]
        if "error" in p:
            contestants[group] = {"error": p["error"]}  # type: ignore[dict-item]
            continue
        refs = ref["fp32"] if group == "hidden" else ref["logits"]
        contestants[group] = {
            name: {"step_s": round(p["median_s"][name], 3), "rel_err": err(p["loss"][name], refs)}
            for name in PAIRED[group]
        }
    contestants["topk"] = {
        name: {"step_s": _round(r.get("median_s")), "rel_err": err(r.get("loss"), ref["topk"])}
        for name in CONTESTANTS["topk"]
        if (r := rows.get(("topk", name, 2048), {}))
    }  # separate processes: nothing from another library to pair with
    hidden, logits = pair["hidden"].get("ratios", {}), pair["logits"].get("ratios", {})
    configs = {  # one configuration per claim: its speed against Liger and its own error
        "default": (hidden.get("liger_over_distill"), contestants["hidden"]["distill"]),
        "bf16_logits": (
            hidden.get("liger_over_distill_bf16_logits"),
            contestants["hidden"]["distill_bf16_logits"],
        ),
    }
    flat = [float(rows[("hidden", "distill", n)]["peak_rss_gb"]) for n in sizes  # type: ignore[arg-type]
            if "peak_rss_gb" in rows[("hidden", "distill", n)]]  # fmt: skip
    summary = {
        "n": 2048,
        "threads": args.threads,
        "matmul_out": "fp32" if logits_dtype == torch.float32 else "bf16",
        "vs_liger": {
            name: {
                "speed_ratio": _round(speed),
                "rel_err": c["rel_err"],
                "goal_met": bool(
                    speed and c["rel_err"] is not None and speed >= 1.3 and c["rel_err"] <= 1e-5
                ),
            }
            for name, (speed, c) in configs.items()
        },  # fmt: skip
        "contestants": contestants,
        "logits_speed_ratio_vs_naive": _round(logits.get("naive_over_distill")),
        "logits_speed_ratio_vs_trl": _round(logits.get("trl_over_distill")),
        "speed_ratio_vs_naive_separate_processes": ratio("hidden", "naive", "median_s"),
        "speed_ratio_vs_liger_separate_processes": ratio("hidden", "liger", "median_s"),
        "mem_ratio_vs_naive": ratio("hidden", "naive", "peak_rss_gb"),
        "bf16_logits_mem_ratio_vs_naive": ratio(
            "hidden", "naive", "peak_rss_gb", "distill_bf16_logits"
        ),
        "mem_spread_1024_8192": round(max(flat) / min(flat) - 1, 4) if len(flat) > 1 else None,
        "logits_mem_ratio_vs_naive": ratio("logits", "naive", "peak_rss_gb"),
        "logits_mem_ratio_vs_trl": ratio("logits", "trl", "peak_rss_gb"),
        "topk_mem_ratio_vs_naive": ratio("topk", "naive", "peak_rss_gb"),
        "topk_speed_ratio_vs_naive_separate_processes": ratio("topk", "naive", "median_s"),
        "rel_err_vs_fp32_same_bf16_logits": err(
            rows[("hidden", "distill_bf16_logits", 2048)].get("loss"), ref["bf16_logits"]
        ),
        "distill_peak_rss_gb": rows[("hidden", "distill", 2048)].get("peak_rss_gb"),
        "reference": ref,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
