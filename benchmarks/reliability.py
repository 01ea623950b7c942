"""Reliability figures for docs/reliability.md: seeded SIGKILLs per command, and teacher faults.

    python benchmarks/reliability.py                      # 50 kills per command, faults at 5/10/20%
    python benchmarks/reliability.py --kills 10 --no-faults   # quicker, no vLLM server

Kills: `distill generate`, `distill offpolicy` and `distill onpolicy` on a tiny seeded pair, in
rounds of `--per-round` kills into a fresh run dir, then a rerun to the end, compared with an
uninterrupted run (tests/test_reliability_kills.py: same rows, no duplicates, whole shards; the
same loss at every logged step). Faults: `distill generate --store-topk` through a fault-injecting
proxy in front of a real vLLM server at each `--rates` value (tests/test_reliability_faults.py):
rows kept, top-k equal to a direct score, every injected fault counted as a retry in metrics.
Figures are also written to `--out` after every round, so an interrupted run still leaves the
count it reached. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harnesses live in tests/


def tiny_pair(root: Path):  # noqa: ANN201 (tests.conftest.TinyPair, imported lazily)
    """The tests' tiny pair, built the same way (seeded, no hub)."""
    from distill.tasks import corpus
    from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer
    from tests.conftest import TinyPair

    tokenizer = train_tokenizer(corpus(400, seed=0), vocab_size=500)
    teacher = tiny_qwen3(TINY_SHAPES["tiny-teacher"], tokenizer, seed=1)
    student = tiny_qwen3(TINY_SHAPES["tiny-student"], tokenizer, seed=2)
    save_pretrained(teacher, tokenizer, root / "teacher")
    save_pretrained(student, tokenizer, root / "student")
    return TinyPair(tokenizer, teacher, student, root / "teacher", root / "student")


def kills(root: Path, pair, total: int, per_round: int, figures: dict, out: Path) -> None:  # noqa: ANN001
    from tests import test_reliability_kills as k

    ctx = k.context()
    commands = [
        k.generate_command(pair, k.write_prompts(root / "prompts.jsonl", 6)),
        k.offpolicy_command(pair),
        k.onpolicy_command(pair),
    ]
    for command in commands:
        reference = k.reference_run(ctx, command, root)
        row = figures["kills"][command.name] = {"attempted": 0, "landed": 0, "rounds": 0,
                                                "rounds_equal": 0, "seconds": 0.0}  # fmt: skip
        seed = 0
        t0 = time.perf_counter()
        while row["landed"] < total:
            seed += 1
            n = min(per_round, total - row["landed"])
            try:
                landed = k.survive(ctx, command, root, reference, seed=seed, kills=n)
                row["rounds_equal"] += 1
            except AssertionError as e:  # a real failure: publish it, do not hide it
                landed = n
                row.setdefault("failures", []).append(f"round {seed}: {e}"[:300])
            row["attempted"] += n
            row["landed"] += landed
            row["rounds"] += 1
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out.write_text(json.dumps(figures, indent=2))
            print(f"{command.name}: {row['landed']}/{total} kills, round {seed} "
                  f"{'equal' if 'failures' not in row else 'FAILURES'}", flush=True)  # fmt: skip


def faults(root: Path, pair, rates: list[float], figures: dict, out: Path) -> None:  # noqa: ANN001
    import numpy as np
    from typer.testing import CliRunner

    from cli import app
    from distill.rundir import read_metrics
    from distill.teacher_data import read_rows
    from teachers import launch
    from teachers.server import ServerTeacher
    from tests import test_reliability_faults as f
    from tests.test_reliability_kills import write_prompts

    real = ServerTeacher.connect.__func__  # type: ignore[attr-defined]
    ServerTeacher.connect = classmethod(  # type: ignore[method-assign]
        lambda cls, urls, model, *, max_top_k=20, config=f.CLIENT: real(
            cls, urls, model, max_top_k=max_top_k, config=f.CLIENT
        )
    )
    port = launch.free_port()
    cmd = launch.serve_command(launch.resolve_preset(str(pair.teacher_dir)), port=port, cpu=True,
                               max_logprobs=8)  # fmt: skip
    proc = launch.start_server(cmd, launch.server_env(cpu=True), root / "server.log")
    url = f"http://127.0.0.1:{port}"
    prompts = write_prompts(root / "fault-prompts.jsonl", 16)
    runner = CliRunner()
    try:
        launch.wait_healthy(url, proc, timeout_s=600)
        for i, rate in enumerate(rates):
            proxy = f.start_proxy(url, rate=rate, seed=i)
            run = root / f"faults-{rate}"
            t0 = time.perf_counter()
            try:
                result = runner.invoke(app, [
                    "generate", "--run-dir", str(run), "--teacher", str(pair.teacher_dir),
                    "--teacher-backend", "server", "--teacher-url", proxy.url, "--prompts",
                    str(prompts), "--max-tokens", "12", "--shard-size", "4",
                    "--store-topk", "4"])  # fmt: skip
            finally:
                proxy.shutdown()
            rows = read_rows(run / "teacher_data") if result.exit_code in (0, 2) else []
            direct = ServerTeacher.connect([url], str(pair.teacher_dir), max_top_k=8)
            seqs = [[*r["prompt_ids"], *r["response_ids"]] for r in rows]  # type: ignore[misc]
            scores = direct.score(seqs, [len(r["prompt_ids"]) for r in rows], 4) if rows else []  # type: ignore[arg-type]
            whole = sum(
                np.array_equal(np.asarray(r["topk_ids"]), s.ids)
                for r, s in zip(rows, scores, strict=True)
            )
            record = [m for m in read_metrics(run) if m["phase"] == "generate"]
            figures["faults"][str(rate)] = {
                "requests": proxy.requests, "injected": dict(proxy.injected),
                "retried": record[-1].get("teacher_retries") if record else None,
                "rows": len(rows), "rows_expected": 32, "rows_whole": int(whole),
                "exit_code": result.exit_code, "seconds": round(time.perf_counter() - t0, 1),
            }  # fmt: skip
            out.write_text(json.dumps(figures, indent=2))
            print(f"faults at {rate:.0%}: {figures['faults'][str(rate)]}", flush=True)
    finally:
        launch.stop_server(proc)


def bad_input_cases() -> int:
    """Test items in tests/test_bad_inputs.py (each is one case)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_bad_inputs.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(1 for line in listing.splitlines() if line.startswith("tests/test_bad_inputs.py::"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Reliability figures for docs/reliability.md")
    parser.add_argument("--kills", type=int, default=50, help="kills per command")
    parser.add_argument("--per-round", type=int, default=5, help="kills before each rerun")
    parser.add_argument("--rates", type=float, nargs="*", default=[0.05, 0.10, 0.20])
    parser.add_argument("--no-faults", action="store_true", help="skip the vLLM fault runs")
    parser.add_argument("--out", type=Path, default=Path("reliability.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    random.seed(0)
    figures: dict = {"kills": {}, "faults": {}, "bad_inputs": bad_input_cases(),
                     "kills_target": args.kills}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="distill-reliability-") as tmp:
        root = Path(tmp)
        pair = tiny_pair(root / "pair")
        if not args.no_faults:
            faults(root, pair, args.rates, figures, args.out)
        kills(root, pair, args.kills, args.per_round, figures, args.out)
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
