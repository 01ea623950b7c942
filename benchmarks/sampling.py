"""Drawing a token: distill's inverse-CDF `draw` vs `torch.multinomial`, alone and in a decode.

    flock /tmp/distill-heavy.lock python benchmarks/sampling.py              # ~3 min, ~4 GiB
    python benchmarks/sampling.py --skip-decode --rows 4 16 64               # the draw alone

1. The draw alone: (rows, 151,669) probabilities (Qwen3's real ids), one id per row, each
   contestant timed in the same process, their order alternating every round; the median per
   contestant. Exactness beside speed: the total-variation distance between each contestant's
   histogram of 200,000 draws and the probabilities (10 ids), against that of a second
   multinomial histogram (the sampling noise floor).
2. In a decode (`--skip-decode` leaves it out): a random-initialised model of Qwen3-0.6B's
   configuration (28 layers, hidden 1,024, tied 151,936-row head) in --dtype, --rows prompts of
   17 tokens, --max-tokens new tokens at T=1 with no filter (every id drawn from), then at Qwen3's
   thinking preset (T=0.6, top-p 0.95, top-k 20): `students.sample.sample` (distill's sampler)
   against transformers' `generate` (what TRL's DistillationTrainer calls), alternating, every
   response exactly --max-tokens long (no eos). tokens/s = sampled tokens / median seconds.

Runs on the allocator the `distill` command picks (tcmalloc where installed). The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

VOCAB, VOCAB_ROWS = 151_669, 151_936  # Qwen3: tokenizer ids, head rows


def paired(contestants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per contestant; one call of each per round, the order reversed each round."""
    names = list(contestants)
    for name in names:  # warm-up: first calls allocate and fault pages in
        contestants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            contestants[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def draw_alone(rows: list[int], rounds: int) -> dict[str, Any]:
    import torch

    from students.sample import draw

    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    for B in rows:
        probs = torch.randn(B, VOCAB, generator=g).mul_(3).softmax(-1)
        med = paired({
            "draw": lambda probs=probs: draw(probs, g),
            "multinomial": lambda probs=probs: torch.multinomial(probs, 1, generator=g),
        }, rounds)  # fmt: skip
        out[f"rows{B}"] = {
            "draw_ms": med["draw"] * 1e3,
            "multinomial_ms": med["multinomial"] * 1e3,
            "speedup": med["multinomial"] / med["draw"],
        }
        print(f"{B:>3} rows: draw {med['draw'] * 1e3:.2f} ms, multinomial "
              f"{med['multinomial'] * 1e3:.2f} ms", flush=True)  # fmt: skip
    # Exactness: 200,000 draws of a 10-id distribution with two ids of probability 0.
    p = torch.tensor([0.3, 0.0, 0.2, 0.15, 0.1, 0.1, 0.0, 0.08, 0.05, 0.02])
    n = 200_000
    rows_p = p.expand(n, -1)

    def tv(ids: torch.Tensor) -> float:
        return 0.5 * float((torch.bincount(ids.flatten(), minlength=10) / n - p).abs().sum())

    out["tv_distance"] = {
        "draw": tv(draw(rows_p, g)),
        "multinomial": tv(torch.multinomial(rows_p, 1, generator=g)),
        "multinomial_again": tv(torch.multinomial(rows_p, 1, generator=g)),
        "draws": n,
    }
    return out


def in_decode(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from students.sample import SamplingParams, sample

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB_ROWS, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    model: Any = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    prompts = [torch.randint(0, VOCAB, (17,)).tolist() for _ in range(args.decode_rows)]
    ids = torch.tensor(prompts)
    N = args.max_tokens
    out: dict[str, Any] = {}
    for name, kw in (("t1", {"temperature": 1.0, "top_p": 1.0, "top_k": 0}),
                     ("thinking", {"temperature": 0.6, "top_p": 0.95, "top_k": 20})):  # fmt: skip
        params = SamplingParams(max_tokens=N, **kw)
        gen_config = GenerationConfig(
            do_sample=True, max_new_tokens=N, min_new_tokens=N, pad_token_id=0,
            eos_token_id=None, disable_compile=True, **kw,
        )  # fmt: skip

        def distill(params: SamplingParams = params) -> object:
            return sample(model, prompts, params, eos_id=-1, pad_id=0, vocab_size=VOCAB)

        def transformers(gen_config: GenerationConfig = gen_config) -> object:
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=gen_config)  # fmt: skip

        med = paired({"distill": distill, "transformers": transformers}, args.decode_rounds)
        tokens = args.decode_rows * N
        out[name] = {
            "distill_tokens_per_s": tokens / med["distill"],
            "transformers_tokens_per_s": tokens / med["transformers"],
            "speedup": med["transformers"] / med["distill"],
        }
        row = out[name]
        print(f"decode {name}: distill {row['distill_tokens_per_s']:.1f} tokens/s, "
              f"transformers {row['transformers_tokens_per_s']:.1f} ({row['speedup']:.3f}x)",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="draw vs torch.multinomial, alone and in a decode")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--decode-rows", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--decode-rounds", type=int, default=3)
    args = p.parse_args()
    from cli import rerun_on_tcmalloc

    rerun_on_tcmalloc()  # on the allocator the `distill` command runs on (students/memory.py)
    import torch

    from students.memory import allocator

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "config": {
            "vocab": VOCAB,
            "threads": args.threads,
            "allocator": allocator(),
            "rounds": args.rounds,
        },
        "draw": draw_alone(args.rows, args.rounds),
    }
    if not args.skip_decode:
        result["config"] |= {
            "dtype": args.dtype, "decode_rows": args.decode_rows, "max_tokens": args.max_tokens,
            "decode_rounds": args.decode_rounds,
        }  # fmt: skip
        result["decode"] = in_decode(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
