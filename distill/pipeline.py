"""`distill run`: teacher data -> off-policy -> on-policy, measured before and after each stage.

Every stage resumes: finished shards are skipped, trainers restart from their last checkpoint,
and finished measurements are read back from eval.json. Rerunning a killed `distill run` with the
same arguments therefore finishes the same run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from distill import evaluate, manifest
from distill.accounting import GpuLedger
from distill.batch import Example
from distill.errors import DistillError
from distill.loop import LogFn, no_log
from distill.offpolicy import generate as gen
from distill.offpolicy import train as offpolicy
from distill.onpolicy import train as onpolicy
from distill.parity import check_conversations
from distill.prompts import Prompt
from distill.rundir import atomic_write_json, read_json, record_config
from distill.teacher_data import read_rows
from teachers.chat import Mode
from teachers.protocol import Teacher, TopK


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """`distill run`'s own defaults: the whole pipeline on the embedded pair, in minutes on a CPU.

    They differ from the trainers' Config defaults on purpose. The embedded student is a small
    model trained from its init on a narrow task: a high off-policy LR (3e-3, not 1e-3) and large
    batches converge it in 300 steps; responses of 48 tokens hold its answers in both modes.
    """

    n_prompts: int = 1024  # training prompts
    eval_prompts: int = 48  # held-out prompts
    max_tokens: int = 48  # every stage's response limit
    offpolicy_steps: int = 300
    offpolicy_batch_size: int = 64
    offpolicy_lr: float = 3e-3
    onpolicy_steps: int = 40


RECIPE = Recipe()


@dataclass(frozen=True, kw_only=True)
class Result:
    generation: gen.Summary
    evals: dict[str, dict[str, float]]  # stage -> metric -> value
    ledger: GpuLedger


def heldout_examples(run_dir: Path, output: str) -> list[Example]:
    """Held-out teacher responses with their stored top-k, as evaluation examples."""
    rows = [r for r in read_rows(run_dir / output) if r["finish_reason"] == "stop"]
    return [
        Example(
            prompt_ids=list(r["prompt_ids"]),  # type: ignore[arg-type]
            response_ids=list(r["response_ids"]),  # type: ignore[arg-type]
            train=~np.asarray(r["forced"], dtype=bool),
            topk=TopK(
                ids=np.asarray(r["topk_ids"], dtype=np.int32),
                logprobs=np.asarray(r["topk_logprobs"], dtype=np.float32),
                actual_logprobs=np.zeros(len(r["response_ids"]), np.float32),  # type: ignore[arg-type]
            ),
        )
        for r in rows
    ]


def measure(
    model_dir: str,
    stage: str,
    teacher: Teacher,
    heldout: Sequence[Example],
    eval_prompts: Sequence[Prompt],
    config: evaluate.Config,
    modes: Sequence[Mode],
    ledger: GpuLedger,
) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {
        "heldout_kl": evaluate.heldout_kl(model, heldout, tokenizer),
        "onpolicy_rkl": evaluate.onpolicy_divergence(
            model, teacher, tokenizer, eval_prompts, modes, config, ledger
        ),
    }
    for mode in modes:
        out[f"accuracy_{mode}"] = evaluate.accuracy(
            model, tokenizer, eval_prompts, mode, config, ledger
        )
    return out


def run(
    *,
    run_dir: Path,
    teacher: Teacher,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student: str,
    train_prompts: Sequence[Prompt],
    eval_prompts: Sequence[Prompt],
    gen_config: gen.Config,
    off_config: offpolicy.Config,
    on_config: onpolicy.Config,
    eval_config: evaluate.Config,
    force: bool = False,
    log: LogFn = no_log,
    progress: gen.ProgressFn | None = None,
    announce: Callable[[str], None] = print,
    teacher_devices: int = 0,
) -> Result:
    """`teacher_devices`: GPUs a remote teacher holds for the whole run (0: it runs in-process);
    the ledger charges them while reserved, not only while they score."""
    assert Path(on_config.student) == off_config.run_dir / off_config.output / "checkpoint", (
        "on-policy starts from the off-policy checkpoint"
    )
    check_conversations(teacher_tokenizer, AutoTokenizer.from_pretrained(student))
    for name, cfg in (
        ("generate", gen_config),
        ("offpolicy", off_config),
        ("onpolicy", on_config),
        ("eval", eval_config),
    ):
        record_config(run_dir, name, cfg, force=force)
    manifest.write(
        run_dir, teacher=teacher.name, student=student, prompts=train_prompts, seed=gen_config.seed
    )
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json", teacher_devices=teacher_devices)

    announce("teacher writes responses in both modes")
    summary = gen.generate(
        gen_config, teacher, teacher_tokenizer, train_prompts, ledger, progress, force=force
    )
    held = replace(
        gen_config, output="eval_data", store_topk=eval_config.top_k, samples_per_prompt=1
    )
    gen.generate(held, teacher, teacher_tokenizer, eval_prompts, ledger, progress, force=force)
    ledger.save(run_dir / "ledger.json")
    heldout = heldout_examples(run_dir, "eval_data")
    if not heldout:
        raise DistillError("every held-out teacher response was truncated: raise --max-tokens")

    evals_path = run_dir / "eval.json"
    evals: dict[str, dict[str, float]] = read_json(evals_path, default={})

    def stage(name: str, model_dir: str) -> None:
        if name not in evals:
            announce(f"measuring the student: {name}")
            ledger.mark(name)  # plots place this stage at the device-hours spent so far
            evals[name] = measure(
                model_dir,
                name,
                teacher,
                heldout,
                eval_prompts,
                eval_config,
                gen_config.modes,
                ledger,
            )
            atomic_write_json(evals_path, evals)
            ledger.save(run_dir / "ledger.json")

    stage("before", student)
    announce("off-policy distillation: the student learns from the teacher's responses")
    off = offpolicy.train(off_config, ledger, log)
    stage("after_offpolicy", str(off.checkpoint))
    announce("on-policy distillation: the student samples, the teacher scores, reverse KL")
    on = onpolicy.train(on_config, teacher, list(train_prompts), ledger, log)
    stage("after_onpolicy", str(on.checkpoint))
    ledger.save(run_dir / "ledger.json")
    return Result(generation=summary, evals=evals, ledger=ledger)


def summarize(evals: Mapping[str, Mapping[str, float]]) -> str:
    return json.dumps({k: dict(v) for k, v in evals.items()}, sort_keys=True)
