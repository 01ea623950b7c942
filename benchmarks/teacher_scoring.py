"""Teacher scoring throughput: distill's vLLM engine backend and server client vs raw vLLM calls.

    python benchmarks/teacher_scoring.py                      # tiny Qwen3 teacher, built here
    python benchmarks/teacher_scoring.py --n 8 --length 64 --repeats 1   # quick (~2 minutes)
    python benchmarks/teacher_scoring.py --model DIR --top-k 20 --n 64 --length 512

Both sides score the same sequences with the same request (prompt_logprobs=K, max_tokens=1,
detokenize=False). "Raw" stops at vLLM's own output (engine) or at the parsed JSON (server);
distill additionally builds the packed TopK. The tiny teacher has Qwen3's 151,936-row head, so
its top-k ids need 18 bits and go through TopK's tagged packing, as a real Qwen3 teacher's do.
Also reported: bytes per token held in memory after parsing, measured two ways: the nbytes of
the buffers the parsed arrays keep alive, and what tracemalloc sees freed when the parsed
scores are dropped (their Python objects included); the goal is 6k + 4.
And bytes per token on the wire. The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def best_of_pair(
    raw: Callable[[], object], ours: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Best times of `raw` and `ours`, run alternately so that load from other processes on a
    shared machine falls on both sides alike."""
    raw()  # warm-up: first calls pay for allocation and caches
    ours()
    t_raw, t_ours = [], []
    for _ in range(repeats):
        for fn, times in ((raw, t_raw), (ours, t_ours)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(t_raw), min(t_ours)


def tiny_teacher(root: Path, head_rows: int) -> Path:
    from distill.tasks import corpus
    from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer

    tok = train_tokenizer(corpus(400, seed=0), vocab_size=500)
    shape = dataclasses.replace(TINY_SHAPES["tiny-teacher"], vocab_rows=head_rows)
    save_pretrained(tiny_qwen3(shape, tok, seed=1), tok, root / "teacher")
    return root / "teacher"


def held_bytes(arrays: list[np.ndarray]) -> int:
    """nbytes of the distinct buffers `arrays` keep alive (a view holds its base)."""
    owners: dict[int, int] = {}
    for a in arrays:
        while isinstance(a.base, np.ndarray):
            a = a.base
        owners[id(a)] = a.nbytes
    return sum(owners.values())


def main() -> None:
    ap = argparse.ArgumentParser(description="Teacher scoring throughput vs raw vLLM.")
    ap.add_argument("--model", type=Path, default=None, help="local model folder (default: tiny)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--n", type=int, default=32, help="sequences")
    ap.add_argument("--length", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-rows", type=int, default=151_936, help="tiny teacher's head rows")
    args = ap.parse_args()

    import vllm
    from vllm.inputs import TokensPrompt

    from teachers import launch
    from teachers.server import ServerTeacher
    from teachers.vllm import VLLMTeacher

    tmp = tempfile.TemporaryDirectory()
    model = args.model or tiny_teacher(Path(tmp.name), args.head_rows)
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
        t_raw_engine, t_engine = best_of_pair(
            lambda: engine.llm.generate(prompts, sp, use_tqdm=False),
            lambda: engine.score(seqs, plens, K),
            args.repeats,
        )
        tracemalloc.start()
        scores = engine.score(seqs, plens, K)
        arrays = [a for s in scores for a in (s.low_ids, s.tagged_logprobs, s.actual_logprobs)]
        held = held_bytes(arrays) / tokens
        tag_bits = max(s.tag_bits for s in scores)
        gc.collect()
        holding = tracemalloc.get_traced_memory()[0]
        del scores, arrays
        gc.collect()
        traced = (holding - tracemalloc.get_traced_memory()[0]) / tokens  # freed with the scores
        tracemalloc.stop()
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

        t_raw_server, t_server = best_of_pair(
            raw_server, lambda: client.score(seqs, plens, K), args.repeats
        )
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
        f"held after parsing: {held:.1f} B/token in arrays, {traced:.1f} B/token traced "
        f"(6k+4 = {6 * K + 4}; id bits in the mantissas: {tag_bits}); "
        f"on the wire: {wire:,.0f} B/token"
    )
    print(
        json.dumps(
            {
                "engine_ratio_vs_raw": round(t_raw_engine / t_engine, 3),
                "server_ratio_vs_raw": round(t_raw_server / t_server, 3),
                "bytes_per_token": round(held, 1),
                "traced_bytes_per_token": round(traced, 1),
                "tag_bits": tag_bits,
                "wire_bytes_per_token": round(wire, 1),
                "top_k": K,
                "tokens": tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
