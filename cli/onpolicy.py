"""`distill onpolicy`: the student samples, the teacher scores, the student minimises a divergence.

distill onpolicy --run-dir runs/x        # embedded teacher; student: RUN_DIR/offpolicy/checkpoint
distill onpolicy --run-dir runs/x --student S --divergence jsd --beta 0.5 --lmbda 0.25
distill onpolicy --run-dir runs/x --sampler vllm --sync-every 4   # student sampled by vLLM
distill onpolicy --run-dir runs/x --lora-rank 16   # adapters only; vLLM gets merged weights
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from accelerate import PartialState
from transformers import AutoTokenizer

from cli.app import app
from cli.offpolicy import FusedLossOpt, LoraAlphaOpt, LoraRankOpt
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.resolve import (
    BackendOpt,
    DtypeOpt,
    GradCheckpointOpt,
    ModesOpt,
    PromptsOpt,
    RunDir,
    TeacherDtypeOpt,
    TeacherOpt,
    TeacherParamsOpt,
    UrlOpt,
    prompt_sets,
    resolve_models,
    resolve_modes,
)
from cli.teacher import make_teacher, parse_backend, teacher_metrics
from distill import adapters, pipeline
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.onpolicy import train as onpolicy
from distill.onpolicy.rollout import check_request
from distill.prompts import EMBEDDED
from distill.rundir import append_metrics, prepare, record_config
from teachers.chat import vocab_mismatch
from teachers.hf import REMOTE_CODE_FIX
from teachers.protocol import refuse_remote_code

C = onpolicy.Config


@app.command("onpolicy")
@user_errors
def onpolicy_cmd(
    run_dir: RunDir,
    teacher: TeacherOpt = EMBEDDED,
    student: Annotated[
        str | None, typer.Option(help="default: RUN_DIR/offpolicy/checkpoint")
    ] = None,
    prompts: PromptsOpt = EMBEDDED,
    prompt_column: str = "prompt",
    n_prompts: int = 256,
    steps: int = C.steps,
    prompts_per_step: int = C.prompts_per_step,
    samples_per_prompt: Annotated[int, typer.Option(help="G")] = C.samples_per_prompt,
    micro_batch_size: int = C.micro_batch_size,
    modes: ModesOpt = "both",
    think_ratio: Annotated[float, typer.Option(help="share of prompts in think mode")] = (
        C.think_ratio
    ),
    max_tokens: int = C.max_tokens,
    thinking_budget: Annotated[
        int | None, typer.Option(help="thinking tokens before the stop sentence")
    ] = None,
    top_k: Annotated[int, typer.Option(help="teacher log-probs per position")] = C.top_k,
    divergence: Annotated[
        str, typer.Option(help="reverse_kl, forward_kl, jsd, skew_rkl, skew_fkl or tvd")
    ] = C.divergence,
    beta: Annotated[float, typer.Option(help="JSD(β): 0 forward, 1 reverse")] = C.beta,
    alpha: Annotated[float, typer.Option(help="skew KL mixing weight")] = C.alpha,
    lmbda: Annotated[
        float, typer.Option(help="share of slots taken from RUN_DIR/teacher_data")
    ] = C.lmbda,
    truncation: Annotated[
        str, typer.Option(help="responses at --max-tokens: mask, drop or keep")
    ] = C.truncation,
    sampler: Annotated[str, typer.Option(help="auto (vllm on GPUs), hf or vllm")] = C.sampler,
    sync_every: Annotated[int, typer.Option(help="steps between vLLM weight syncs")] = (
        C.sync_every
    ),
    lr: float = C.lr,
    save_every: int = C.save_every,
    teacher_backend: BackendOpt = "hf",
    teacher_url: UrlOpt = None,
    teacher_max_top_k: Annotated[
        int, typer.Option(help="vllm/server teachers: their max_logprobs")
    ] = 20,
    seed: int = 0,
    lora_rank: LoraRankOpt = C.lora_rank,
    lora_alpha: LoraAlphaOpt = C.lora_alpha,
    fused_loss: FusedLossOpt = C.fused_loss,
    force: bool = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="run Python code shipped in the teacher's folder (auto_map)")
    ] = False,
    dtype: DtypeOpt = C.dtype,
    teacher_dtype: TeacherDtypeOpt = "auto",
    teacher_params: TeacherParamsOpt = 0,
    warmup_steps: Annotated[int, typer.Option(help="steps of linear LR warmup to --lr")] = (
        C.warmup_steps
    ),
    gradient_checkpointing: GradCheckpointOpt = C.gradient_checkpointing,
) -> None:
    """The student samples, the teacher scores its samples, the student minimises the divergence."""
    run_dir = prepare(run_dir)
    student_dir = student or str(run_dir / "offpolicy" / "checkpoint")
    teacher_path, student_path = resolve_models(teacher, student_dir)
    config = onpolicy.Config(
        run_dir=run_dir,
        student=student_path,
        steps=steps,
        prompts_per_step=prompts_per_step,
        samples_per_prompt=samples_per_prompt,
        micro_batch_size=micro_batch_size,
        modes=resolve_modes(modes),
        think_ratio=think_ratio,
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        top_k=top_k,
        divergence=divergence,  # type: ignore[arg-type]  (checked by check_request)
        beta=beta,
        alpha=alpha,
        lmbda=lmbda,
        truncation=truncation,  # type: ignore[arg-type]
        sampler=sampler,  # type: ignore[arg-type]
        sync_every=sync_every,
        lr=lr,
        save_every=save_every,
        seed=seed,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        fused_loss=fused_loss,
        dtype=dtype,
        warmup_steps=warmup_steps,
        gradient_checkpointing=gradient_checkpointing,
    )
    adapters.settings(lora_rank, lora_alpha, seed)  # bad values or no peft: before any record
    console.print(config_table("onpolicy", config))
    train_prompts, _ = prompt_sets(
        prompts, n_prompts, 0 if prompts == EMBEDDED else 1, seed, prompt_column, "answer"
    )
    if Path(teacher_path).is_dir():
        refuse_remote_code(teacher_path, trust=trust_remote_code, fix=REMOTE_CODE_FIX)
        teacher_tok = AutoTokenizer.from_pretrained(
            teacher_path, trust_remote_code=trust_remote_code
        )
        differ = vocab_mismatch(teacher_tok, AutoTokenizer.from_pretrained(student_path))
        if differ is not None:
            raise DistillError(
                f"teacher and student tokenizers differ: {differ}; distil only into a student "
                "that shares the teacher's tokenizer and chat template"
            )
        pipeline.check_parity(teacher_tok, student_path)  # chat template: first differing ids
    the_teacher = make_teacher(
        parse_backend(teacher_backend),
        teacher_path,
        teacher_url or [],
        max_top_k=teacher_max_top_k,
        trust_remote_code=trust_remote_code,
        dtype=teacher_dtype,
        n_params=teacher_params,
    )
    check_request(config, the_teacher, train_prompts)  # before config.json records anything
    record_config(run_dir, "onpolicy", config, force=force)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
    with phase_progress() as bars:
        try:
            summary = onpolicy.train(config, the_teacher, train_prompts, ledger, bars.log)
        finally:  # retries are worth seeing most when the run failed
            if faults := teacher_metrics(the_teacher):
                append_metrics(run_dir, {"phase": "onpolicy.teacher", **faults})
    # Under `accelerate launch` rank 0 writes the job's ledger, the others their shards of it.
    ledger.save(run_dir / "ledger.json", rank=PartialState().process_index)
    m = summary.metrics
    console.print(
        f"final loss {summary.final_loss:.4f}  kl {m.get('kl', float('nan')):.4f}  "
        f"top-k overlap {m.get('topk_overlap', float('nan')):.2f}  "
        f"truncation {m.get('truncation_rate', float('nan')):.2f}; "
        f"checkpoint {summary.checkpoint}"
    )
