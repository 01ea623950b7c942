"""Teacher scoring throughput: distill's vLLM engine backend and server client vs raw vLLM calls.

    python benchmarks/teacher_scoring.py                      # tiny Qwen3 teacher, built here
    python benchmarks/teacher_scoring.py --model DIR --top-k 20 --n 64 --length 512

Both sides score the same sequences with the same request (prompt_logprobs=K, max_tokens=1,
detokenize=False). "Raw" stops at vLLM's own output (engine) or at the parsed JSON (server);
distill additionally builds the (L, K) numpy arrays. Also reported: bytes per token held in
memory after parsing (ids int32 + logprobs float32 + the actual token's logprob), and bytes per
token on the wire. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def tiny_teacher(root: Path) -> Path:
    from distill.tasks import corpus
    from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer

    tok = train_tokenizer(corpus(400, seed=0), vocab_size=500)
    save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-teacher"], tok, seed=1), tok, root / "teacher")
    return root / "teacher"


def main() -> None:
    ap = argparse.ArgumentParser(description="Teacher scoring throughput vs raw vLLM.")
    ap.add_argument("--model", type=Path, default=None, help="local model folder (default: tiny)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--n", type=int, default=32, help="sequences")
    ap.add_argument("--length", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import vllm
    from vllm.inputs import TokensPrompt

    from teachers import launch
    from teachers.server import ServerTeacher
    from teachers.vllm import VLLMTeacher

    tmp = tempfile.TemporaryDirectory()
    model = args.model or tiny_teacher(Path(tmp.name))
    K, n, T, P = args.top_k, args.n, args.length, args.prompt
    rng = np.random.default_rng(0)
    shape = launch.model_shape(str(model))
    seqs = [rng.integers(0, shape.vocab_size, size=T).tolist() for _ in range(n)]
    plens = [P] * n
    tokens = n * (T - P)  # completion tokens scored

    # The server starts first so its start-up overlaps the engine's.
    port = launch.free_port()
    cmd = launch.serve_command(
        launch.resolve_preset(str(model)),
        port=port,
        cpu=launch.on_cpu(),
        max_logprobs=K,
        max_model_len=max(T + 1, 512),
    )
    proc = launch.start_server(cmd, launch.server_env(launch.on_cpu()))
    try:
        engine = VLLMTeacher.from_pretrained(model, max_top_k=K, max_model_len=max(T + 1, 512))
        sp = vllm.SamplingParams(
            max_tokens=1, temperature=1.0, prompt_logprobs=K, detokenize=False, flat_logprobs=True
        )
        prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
        t_raw_engine = best_of(
            lambda: engine.llm.generate(prompts, sp, use_tqdm=False), args.repeats
        )
        t_engine = best_of(lambda: engine.score(seqs, plens, K), args.repeats)
        scores = engine.score(seqs, plens, K)
        held = sum(s.nbytes for s in scores) / tokens
        engine.close()

        url = f"http://127.0.0.1:{port}"
        launch.wait_healthy(url, proc)
        client = ServerTeacher.connect([url], str(model), max_top_k=K)
        body = json.dumps(
            {
                "model": client.model,
                "prompt": seqs,
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": K,
            }
        ).encode()

        def raw_server() -> object:
            req = urllib.request.Request(
                f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())

        t_raw_server = best_of(raw_server, args.repeats)
        t_server = best_of(lambda: client.score(seqs, plens, K), args.repeats)
        client.bytes_received = 0
        client.score(seqs, plens, K)
        wire = client.bytes_received / tokens
    finally:
        launch.stop_server(proc)
        tmp.cleanup()

    table = Table(title=f"teacher scoring: {n} x {T} tokens, top-{K}")
    for col in ("path", "tokens/s", "vs raw"):
        table.add_column(col)
    for name, t, raw in (
        ("raw engine", t_raw_engine, t_raw_engine),
        ("distill VLLMTeacher", t_engine, t_raw_engine),
        ("raw server (1 request, json.loads)", t_raw_server, t_raw_server),
        ("distill ServerTeacher", t_server, t_raw_server),
    ):
        table.add_row(name, f"{tokens / t:,.0f}", f"{raw / t:.2f}x")
    console = Console()
    console.print(table)
    console.print(
        f"held after parsing: {held:.1f} B/token (6k+4 = {6 * K + 4}); "
        f"on the wire: {wire:,.0f} B/token"
    )
    print(
        json.dumps(
            {
                "engine_ratio_vs_raw": round(t_raw_engine / t_engine, 3),
                "server_ratio_vs_raw": round(t_raw_server / t_server, 3),
                "bytes_per_token": round(held, 1),
                "wire_bytes_per_token": round(wire, 1),
                "top_k": K,
                "tokens": tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
