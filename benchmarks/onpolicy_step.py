"""On-policy distillation step at Qwen3-0.6B size: `distill onpolicy` vs TRL's DistillationTrainer.

    pip install -e ".[bench]"                 # trl>=1.16 (stable trl.DistillationTrainer)
    flock /tmp/distill-heavy.lock python benchmarks/onpolicy_step.py          # ~12 GiB, ~10 min CPU
    python benchmarks/onpolicy_step.py --teacher-layers 28 --max-tokens 128   # a GPU-sized run

Models (random init, built here, saved once, loaded by every side): the student has Qwen3-0.6B's
configuration (28 layers, hidden 1,024, 16/8 heads of 128, tied 151,936-row head); the teacher has
Qwen3-1.7B's width (hidden 2,048, MLP 6,144, 16/8 heads of 128, tied head) with --teacher-layers
of its 28 layers (the default 6 keeps a CPU run within ~14 GiB beside the trained student). The
tokenizer is the embedded BPE widened with unreachable ids to Qwen3's 151,669 (so the softmax and
sampling run over Qwen3's vocabulary; the 267 extra head rows are padding, as in Qwen3).

Both tools get the same prompts (thinking-mode chat prompts of the embedded task, rendered by
distill and handed to TRL as the same text), batch (--prompts x --g sequences per step, one
optimizer step each), sampled length (random-init models never emit eos: every response is
exactly --max-tokens long), sampling (T=1, no top-k/top-p), --dtype (fp32 by default; bfloat16:
pure bf16 weights on both sides), AdamW (torch's fused kernel on
both sides: distill's default, and transformers' default for torch >= 2.8; lr 1e-5, betas
0.9/0.95, no weight decay), grad clip 1.0, constant lr. Objective: TRL `beta=1` (reverse KL over
the teacher's and student's full 151,936-row heads, chunked); distill `--divergence reverse_kl` on
the teacher's top-k plus one tail bucket, once at its default --top-k and once at --top-k-max
(default 151,669, every real id: the dense objective over the real ids, with the teacher's
padded-row mass in its tail; the HF teacher serves up to its head width, 151,936, but a K above
the tokenizer's length adds only padded rows, which the loss drops into the tail). A separate
`gap` process measures, on one sampled batch, how far each top-k objective is from the
full-vocabulary reverse KL (mean nats per token, fp64).

Per phase, same method on both sides (wall-clock of the timed steps; the first step is warm-up):
- sample: the student's generation (distill `HFSampler.generate`, TRL `_generate`);
- teacher: the teacher's forward (distill `HFTeacher.score`: backbone + head + top-k; TRL: the
  teacher backbone; its head runs inside TRL's chunked loss, so it is counted in `loss_backward`);
- optimizer: `torch.optim.AdamW.step`;
- loss_backward: the rest of the step (student forward, loss, backward, grad clip, bookkeeping).
tokens/s = sampled response tokens / timed step seconds; every phase is also given in CPU
seconds of the process (`time.process_time`, all threads), and tokens per CPU second: on a
shared machine the wall-clock of two processes run one after the other sees different loads,
while CPU time counts only the work done (memory-bandwidth contention still shows).
Memory: peak RSS (`ru_maxrss`, read at the end of the last step) above the RSS right after
imports (`peak_above_import_gib`: models, gradients, optimizer state and the step), and above
the RSS when the first step starts (`step_peak_gib`: what the step itself adds: gradients,
AdamW state, activations). Each side runs in its own process, one after another (never
together), on the allocator the `distill` command would run on (tcmalloc where installed; on
glibc distill trims the heap before each layer: students/memory.py). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

VOCAB, VOCAB_ROWS = 151_669, 151_936  # Qwen3: tokenizer ids, head rows
LR = 1e-5
PHASES = ("sample", "teacher", "loss_backward", "optimizer", "total")
SIDES = ("build", "gap", "distill", "distill_max", "trl")


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def wide_tokenizer():  # noqa: ANN201  (PreTrainedTokenizerFast)
    """The embedded BPE tokenizer with unreachable ids appended up to Qwen3's 151,669."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from distill.tasks import corpus
    from students.tiny import QWEN3_CHAT_TEMPLATE, train_tokenizer

    spec = json.loads(train_tokenizer(corpus(400, seed=0), 500).backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = spec["added_tokens"]
    base, first_added = len(vocab), VOCAB - len(added)
    n = 0
    while len(vocab) < first_added:  # plain letters: valid byte-level strings BPE never builds
        name = f"zq{n}x"
        n += 1
        if name not in vocab:
            vocab[name] = len(vocab)
    assert base <= min(a["id"] for a in added), "special tokens sit after the BPE vocabulary"
    for i, a in enumerate(added):  # specials at the top, as Qwen3 places them
        a["id"] = first_added + i
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    assert len(tok) == VOCAB, len(tok)
    return tok


def build_pair(args: argparse.Namespace, root: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = wide_tokenizer()
    special = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    shapes = {
        "student": dict(
            hidden_size=1024, intermediate_size=3072, num_hidden_layers=args.student_layers
        ),
        "teacher": dict(
            hidden_size=2048, intermediate_size=6144, num_hidden_layers=args.teacher_layers
        ),
    }
    for seed, (name, shape) in enumerate(shapes.items(), start=1):
        config = Qwen3Config(
            vocab_size=VOCAB_ROWS, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=None,
            **shape, **special,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).float()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        del model


class Phases:
    """Per-step wall-clock by phase, filled by wrappers around the calls that do the work."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self.step_start_rss = 0.0
        self.peak = 0.0
        self.prompt_tokens: list[int] = []

    def begin(self) -> None:
        if not self.steps and not self.current:
            self.step_start_rss = rss_gib()
        self.current = {f"{p}{c}": 0.0 for p in PHASES for c in ("", "_cpu")} | {"tokens": 0.0}
        self.current["t0"], self.current["c0"] = time.perf_counter(), time.process_time()

    def end(self) -> None:
        c = self.current
        c["total"] = time.perf_counter() - c.pop("t0")
        c["total_cpu"] = time.process_time() - c.pop("c0")
        for suffix in ("", "_cpu"):
            parts = sum(c[f"{p}{suffix}"] for p in ("sample", "teacher", "optimizer"))
            c[f"loss_backward{suffix}"] = c[f"total{suffix}"] - parts
        self.steps.append(c)
        self.peak = peak_gib()  # before anything after the step (distill saves a checkpoint)

    def timed(self, key: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            self.current[key] += time.perf_counter() - t0
            self.current[f"{key}_cpu"] += time.process_time() - c0
            return out

        return wrapper

    def result(self, import_rss: float) -> dict[str, Any]:
        timed = self.steps[1:]  # the first step is warm-up
        seconds = sum(s["total"] for s in timed)
        cpu_seconds = sum(s["total_cpu"] for s in timed)
        tokens = sum(s["tokens"] for s in timed)

        def mean(key: str) -> float:
            return round(sum(s[key] for s in timed) / len(timed), 3)

        return {
            "steps": len(timed),
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds,
            "phase_s": {p: mean(p) for p in PHASES},
            "phase_cpu_s": {p: mean(f"{p}_cpu") for p in PHASES},
            "prompt_tokens_mean": sum(self.prompt_tokens) / max(len(self.prompt_tokens), 1),
            "peak_above_import_gib": round(self.peak - import_rss, 3),
            "step_peak_gib": round(self.peak - self.step_start_rss, 3),
        }


def patch_optimizer(phases: Phases) -> None:
    import torch

    torch.optim.AdamW.step = phases.timed("optimizer", torch.optim.AdamW.step)  # type: ignore[method-assign]


def prompt_set(args: argparse.Namespace) -> list[Any]:
    from distill.prompts import embedded_prompts

    return embedded_prompts(args.prompts * args.steps, 0, "train")


def rendered(args: argparse.Namespace, tok: Any) -> list[list[int]]:
    """Token ids of the thinking-mode prompts, as distill's loop renders them."""
    from teachers.chat import render_prompt

    return [render_prompt(tok, p.messages, "think") for p in prompt_set(args)]


def run_distill(args: argparse.Namespace, root: Path, phases: Phases) -> None:
    from distill.accounting import GpuLedger
    from distill.onpolicy import train as onpolicy
    from students.sample import HFSampler, SamplingParams
    from teachers.hf import HFTeacher

    generate, score = HFSampler.generate, HFTeacher.score

    def sample(self: HFSampler, prompts: Any, params: Any) -> Any:
        phases.begin()  # sampling opens each step of the loop (after the weight sync, a no-op)
        phases.prompt_tokens += [len(p) for p in prompts]
        gens = phases.timed("sample", generate)(self, prompts, params)
        phases.current["tokens"] += sum(len(g.token_ids) for g in gens)
        return gens

    HFSampler.generate = sample  # type: ignore[method-assign]
    HFTeacher.score = phases.timed("teacher", score)  # type: ignore[method-assign]
    run_dir = root / f"distill_k{args.top_k}"
    shutil.rmtree(run_dir, ignore_errors=True)  # with --models kept, a finished run would resume
    config = onpolicy.Config(
        run_dir=run_dir, student=str(root / "student"), steps=args.steps,
        prompts_per_step=args.prompts, samples_per_prompt=args.g,
        micro_batch_size=args.prompts * args.g, modes=("think",), max_tokens=args.max_tokens,
        top_k=args.top_k, divergence="reverse_kl", sampler="hf", lr=LR, warmup_steps=0,
        min_lr_ratio=1.0, grad_clip=1.0, dtype=args.dtype, save_every=10**9,
        think_sampling=SamplingParams(temperature=1.0),
    )  # fmt: skip
    prompts = prompt_set(args)
    teacher = HFTeacher.from_pretrained(root / "teacher", dtype=args.dtype)
    # The loop logs each step after its optimizer step: that closes the step.
    onpolicy.train(config, teacher, prompts, GpuLedger(), lambda *a: phases.end())


def run_trl(args: argparse.Namespace, root: Path, phases: Phases) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from distill.onpolicy.schedule import PROMPT_STREAM, permuted

    tok = AutoTokenizer.from_pretrained(root / "student", padding_side="left")
    # distill's loop takes the prompts in a seeded permutation (seed 0, one epoch = every
    # prompt once); TRL reads its dataset in order: hand it that order, so every step of both
    # sides sees the same prompts.
    rendered_ids = rendered(args, tok)
    ids = [rendered_ids[i] for i in permuted(0, PROMPT_STREAM, 0, len(rendered_ids))]
    texts = [tok.decode(i) for i in ids]
    assert [tok(t)["input_ids"] for t in texts] == ids, "prompt text does not round-trip"
    rows = [{"prompt": t} for t in texts for _ in range(args.g)]  # G samples: prompt G times
    config = DistillationConfig(
        output_dir=str(root / "trl_run"), per_device_train_batch_size=args.prompts * args.g,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused", adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=args.max_tokens, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, shuffle_dataset=False,
    )  # fmt: skip

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            phases.begin()

        def on_step_end(self, *a: object, **k: object) -> None:
            phases.end()

    dtype = getattr(torch, args.dtype)  # pure weights of that dtype, as distill's --dtype
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=dtype)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tok, callbacks=[Clock()],
    )  # fmt: skip
    generate, hidden = trainer._generate, trainer._get_last_hidden_state

    def sample(prompts: list[Any]) -> Any:
        out = phases.timed("sample", generate)(prompts)
        phases.prompt_tokens += [len(p) for p in out[0]]
        phases.current["tokens"] += sum(len(c) for c in out[1])
        return out

    def last_hidden(model: Any, *a: Any, **k: Any) -> Any:
        if model is not teacher:
            return hidden(model, *a, **k)
        return phases.timed("teacher", hidden)(model, *a, **k)

    trainer._generate = sample  # type: ignore[method-assign]
    trainer._get_last_hidden_state = last_hidden  # type: ignore[method-assign]
    trainer.train()


def run_gap(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Reverse KL per token on one sampled batch: full 151,936 rows vs distill's objectives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from losses import divergence, topk_support
    from students.sample import SamplingParams, sample

    tok = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32).eval()
    ids = rendered(args, tok)
    ids = ids[: args.prompts]
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    gens = sample(student, ids, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  vocab_size=VOCAB)  # fmt: skip
    out: dict[str, list[float]] = {"full_rows": [], "real_ids": []}
    out |= {f"top{k}_tail": [] for k in (args.top_k, args.top_k_max)}
    mass: list[float] = []
    with torch.no_grad():
        for p, g in zip(ids, gens, strict=True):
            seq = torch.tensor([[*p, *g.token_ids.tolist()]])
            n = len(g.token_ids)
            zs = student(seq).logits[0, len(p) - 1 : len(p) - 1 + n].double()  # (L, V_rows)
            zt = teacher(seq).logits[0, len(p) - 1 : len(p) - 1 + n].double()
            for key, width in (("full_rows", VOCAB_ROWS), ("real_ids", VOCAB)):
                ls, lt = zs[:, :width].log_softmax(-1), zt[:, :width].log_softmax(-1)
                out[key] += divergence("reverse_kl", ls, lt).tolist()
            lt = zt.log_softmax(-1)  # the teacher's top-k is normalised over its full head
            for k in (args.top_k, args.top_k_max):
                vals, top = lt.topk(min(k, VOCAB_ROWS), dim=-1)
                ls, lk = topk_support(zs, top, vals, VOCAB)
                out[f"top{k}_tail"] += divergence("reverse_kl", ls, lk).tolist()
                if k == args.top_k:
                    mass += vals.exp().sum(-1).tolist()
    means = {k: sum(v) / len(v) for k, v in out.items()}
    return {
        "reverse_kl_per_token": means,
        "teacher_mass_in_default_topk": sum(mass) / len(mass),
        "tokens": len(mass),
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.root)
    if args.side == "build":
        return build_pair(args, root)
    if args.side == "gap":
        print(json.dumps(run_gap(args, root)))
        return
    if args.side == "trl":  # imports first: the memory baseline is taken after them
        import trl  # noqa: F401
    else:
        import distill.onpolicy.train  # noqa: F401
    import_rss = rss_gib()
    phases = Phases()
    patch_optimizer(phases)
    (run_trl if args.side == "trl" else run_distill)(args, root, phases)
    print(json.dumps(phases.result(import_rss)))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--g", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=32, help="sampled tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="steps per side; the first is warm-up")
    parser.add_argument("--top-k", type=int, default=16, help="distill's default --top-k")
    parser.add_argument("--top-k-max", type=int, default=VOCAB, help="distill's largest")
    parser.add_argument("--teacher-layers", type=int, default=6, help="of Qwen3-1.7B's 28")
    parser.add_argument("--student-layers", type=int, default=28, help="28: Qwen3-0.6B")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every side")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="weights and compute of both models on both sides (bfloat16: Qwen3's own dtype)",
    )  # fmt: skip
    parser.add_argument("--models", help="keep the built models here and reuse them (same shapes)")
    parser.add_argument("--skip-gap", action="store_true", help="leave out the objective gap")
    parser.add_argument(
        "--previous", help="a JSON file of sides measured before (name -> result): not rerun"
    )
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    # Both sides on the allocator the `distill` command picks (tcmalloc on a CPU host that has it:
    # students/memory.py); the children inherit it.
    from cli import rerun_on_tcmalloc

    rerun_on_tcmalloc()
    from rich.console import Console
    from rich.table import Table

    from students.memory import allocator

    console = Console(stderr=True)
    results: dict[str, dict[str, Any]] = (
        json.loads(Path(args.previous).read_text()) if args.previous else {}
    )
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.models or scratch
        built = args.models and (Path(tmp) / "teacher" / "config.json").exists()
        skip = {"build"} if built else set()
        skip |= {"gap"} if args.skip_gap else set()
        skip |= set(results)
        for name in [s for s in SIDES if s not in skip]:
            side = "distill" if name.startswith("distill") else name
            extra = ["--top-k", str(args.top_k_max)] if name == "distill_max" else []
            cmd = [sys.executable, __file__, *sys.argv[1:], *extra, "--side", side, "--root", tmp]
            console.print(f"[dim]running {name}[/dim]")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            if name != "build":
                results[name] = json.loads(done.stdout.strip().splitlines()[-1])
                console.print(f"[dim]  {results[name]}[/dim]")
    trl_run = results["trl"]
    table = Table(title=f"on-policy step, Qwen3-0.6B student, P={args.prompts} G={args.g} "
                  f"L={args.max_tokens}, {args.dtype}, CPU {args.threads} threads")  # fmt: skip
    cols = ("", "tokens/s", "sample s", "teacher s", "loss+bwd s", "optim s", "step GiB")
    for col in cols:
        table.add_column(col, justify="right")
    names = {"distill": f"distill K={args.top_k}", "distill_max": f"distill K={args.top_k_max}",
             "trl": "TRL DistillationTrainer β=1"}  # fmt: skip
    for key, label in names.items():
        r, ph = results[key], results[key]["phase_s"]
        table.add_row(label, f"{r['tokens_per_s']:.1f}", f"{ph['sample']:.2f}",
                      f"{ph['teacher']:.2f}", f"{ph['loss_backward']:.2f}",
                      f"{ph['optimizer']:.2f}", f"{r['step_peak_gib']:.2f}")  # fmt: skip
    console.print(table)
    summary: dict[str, Any] = {
        "config": {"prompts": args.prompts, "g": args.g, "max_tokens": args.max_tokens,
                   "timed_steps": args.steps - 1, "teacher_layers": args.teacher_layers,
                   "threads": args.threads, "top_k": args.top_k, "top_k_max": args.top_k_max,
                   "dtype": args.dtype, "allocator": allocator()},
        "speedup_vs_trl": round(results["distill"]["tokens_per_s"] / trl_run["tokens_per_s"], 3),
        "cpu_speedup_vs_trl": round(
            results["distill"]["tokens_per_cpu_s"] / trl_run["tokens_per_cpu_s"], 3),
        "cpu_speedup_vs_trl_top_k_max": round(
            results["distill_max"]["tokens_per_cpu_s"] / trl_run["tokens_per_cpu_s"], 3),
        "speedup_vs_trl_top_k_max": round(
            results["distill_max"]["tokens_per_s"] / trl_run["tokens_per_s"], 3),
        "step_mem_ratio_trl_over_distill": round(
            trl_run["step_peak_gib"] / results["distill"]["step_peak_gib"], 3),
        "step_mem_ratio_trl_over_distill_top_k_max": round(
            trl_run["step_peak_gib"] / results["distill_max"]["step_peak_gib"], 3),
        "gap": results.get("gap"),
        **{k: v for k, v in results.items() if k != "gap"},
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
