"""`distill onpolicy`: the student samples, the teacher scores, the student minimises a divergence.

distill onpolicy --run-dir runs/x        # embedded teacher; student: RUN_DIR/offpolicy/checkpoint
distill onpolicy --run-dir runs/x --student S --divergence jsd --beta 0.5 --lmbda 0.25
distill onpolicy --run-dir runs/x --sampler vllm --sync-every 4   # student sampled by vLLM
distill onpolicy --run-dir runs/x --lora-rank 16   # adapters only; vLLM gets merged weights
distill onpolicy --run-dir runs/x --max-staleness 1  # sample + score step k+1 while training k
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from accelerate import PartialState

from cli import dryrun
from cli.offpolicy import FusedLossOpt, LoraAlphaOpt, LoraRankOpt
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.resolve import (
    DEFAULT_BACKEND,
    ENGINE,
    BackendOpt,
    DtypeOpt,
    EngineDevicesOpt,
    EngineMemoryOpt,
    EngineModeOpt,
    EngineSleepOpt,
    EngineTpOpt,
    GradCheckpointOpt,
    MinLrRatioOpt,
    ModesOpt,
    PromptsOpt,
    RunDir,
    SoftSwitchOpt,
    TeacherConcurrencyOpt,
    TeacherDtypeOpt,
    TeacherGpusOpt,
    TeacherMaxLenOpt,
    TeacherOpt,
    TeacherParamsOpt,
    UrlOpt,
    WarmupStepsOpt,
    engine_placement,
    prompt_sets,
    resolve_models,
    resolve_modes,
)
from cli.root import app
from cli.teacher import make_teacher, parse_backend, teacher_devices, teacher_metrics
from distill import adapters, parity
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.onpolicy import train as onpolicy
from distill.onpolicy.rollout import check_request, check_top_k
from distill.prompts import EMBEDDED, Prompt
from distill.rundir import append_metrics, prepare, record_config
from distill.sampling import SamplerKind
from teachers.hf import REMOTE_CODE_FIX
from teachers.protocol import refuse_remote_code
from teachers.server import ServerConfig

C = onpolicy.Config
# The student's sampler, shared with `distill rl` (distill/sampling.py): the same flags on both.
SamplerOpt = Annotated[SamplerKind, typer.Option(help="auto (vllm on GPUs), hf or vllm")]
SyncEveryOpt = Annotated[int, typer.Option(help="steps between vLLM weight syncs", min=1)]
MaxStalenessOpt = Annotated[
    int,
    typer.Option(
        help="weight versions a trained sample may lag (0: in series; 1+: sample and score ahead)"
    ),
]


def dry_onpolicy(
    config: onpolicy.Config,
    teacher: str,
    backend: str,
    urls: list[str],
    max_top_k: int,
    prompts: list[Prompt],
    force: bool,
) -> None:
    """`distill onpolicy --dry-run`: the teacher's top-k limit, the prompts, a changed config."""
    if not dryrun.pending(teacher):
        limit = dryrun.teacher_limit(parse_backend(backend), teacher, urls, max_top_k)
        check_top_k(config.top_k, limit, teacher)
    if not prompts and config.lmbda < 1.0:
        raise DistillError("the prompt set is empty: pass a --prompts file with at least one row")
    record_config(config.run_dir, "onpolicy", config, force=force, write=False)
    g = config.prompts_per_step * config.samples_per_prompt
    dryrun.finish([
        f"load the student {config.student}"
        + (f" with rank-{config.lora_rank} LoRA adapters" if config.lora_rank else ""),
        f"{config.steps} steps: the student ({config.sampler} sampler) writes {g} responses "
        f"of up to {config.max_tokens} tokens, teacher {teacher} ({backend}) scores its top "
        f"{config.top_k}, the student minimises {config.divergence}"
        + (f" (sampled up to {config.max_staleness} weight versions ahead)"
           if config.max_staleness else ""),
        f"checkpoint every {config.save_every} steps to {config.run_dir / config.output}",
    ])  # fmt: skip


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
    modes: ModesOpt = "auto",
    soft_switch: SoftSwitchOpt = C.soft_switch,
    think_ratio: Annotated[float, typer.Option(help="share of prompts in think mode")] = (
        C.think_ratio
    ),
    max_tokens: int = C.max_tokens,
    thinking_budget: Annotated[
        int | None, typer.Option(help="thinking tokens before the stop sentence")
    ] = None,
    top_k: Annotated[int, typer.Option(help="teacher log-probs per position")] = C.top_k,
    divergence: Annotated[
        onpolicy.Divergence,
        typer.Option(help="reverse_kl, forward_kl, jsd, skew_rkl, skew_fkl or tvd"),
    ] = C.divergence,
    beta: Annotated[float, typer.Option(help="JSD(β): 0 forward, 1 reverse")] = C.beta,
    alpha: Annotated[float, typer.Option(help="skew KL mixing weight")] = C.alpha,
    lmbda: Annotated[
        float, typer.Option(help="share of slots taken from RUN_DIR/teacher_data")
    ] = C.lmbda,
    truncation: Annotated[
        onpolicy.Truncation, typer.Option(help="responses at --max-tokens: mask, drop or keep")
    ] = C.truncation,
    sampler: SamplerOpt = C.sampler,
    sync_every: SyncEveryOpt = C.sync_every,
    engine_mode: EngineModeOpt = ENGINE.mode,
    engine_memory: EngineMemoryOpt = ENGINE.gpu_memory_utilization,
    engine_tensor_parallel: EngineTpOpt = ENGINE.tensor_parallel_size,
    engine_sleep: EngineSleepOpt = ENGINE.sleep,
    engine_devices: EngineDevicesOpt = "",
    lr: float = C.lr,
    save_every: int = C.save_every,
    teacher_backend: BackendOpt = DEFAULT_BACKEND,
    teacher_url: UrlOpt = None,
    teacher_max_model_len: TeacherMaxLenOpt = None,
    teacher_concurrency: TeacherConcurrencyOpt = ServerConfig.concurrency,
    teacher_max_top_k: Annotated[
        int, typer.Option(help="vllm/server teachers: their max_logprobs")
    ] = 20,
    seed: int = C.seed,
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
    warmup_steps: WarmupStepsOpt = C.warmup_steps,
    min_lr_ratio: MinLrRatioOpt = C.min_lr_ratio,
    log_every: Annotated[int, typer.Option(help="steps between metrics.jsonl lines")] = (
        C.log_every
    ),
    gradient_checkpointing: GradCheckpointOpt = C.gradient_checkpointing,
    teacher_gpus: TeacherGpusOpt = None,
    dry_run: dryrun.DryRunOpt = False,
    max_staleness: MaxStalenessOpt = C.max_staleness,
) -> None:
    """The student samples, the teacher scores its samples, the student minimises the divergence."""
    held = teacher_devices(teacher_gpus, teacher_url)  # teacher.reserved: every server's GPUs
    run_dir = dryrun.run_dir_for(run_dir)
    student_dir = student or str(run_dir / "offpolicy" / "checkpoint")
    teacher_path, student_path = resolve_models(teacher, student_dir, dry_run)
    config = onpolicy.Config(
        run_dir=run_dir,
        student=student_path,
        steps=steps,
        prompts_per_step=prompts_per_step,
        samples_per_prompt=samples_per_prompt,
        micro_batch_size=micro_batch_size,
        modes=resolve_modes(
            modes,
            None if dryrun.pending(student_path) else student_path,  # not built: Qwen3's modes
            soft_switch=soft_switch,
            thinking_budget=thinking_budget is not None,
        ),
        think_ratio=think_ratio,
        soft_switch=soft_switch,
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        top_k=top_k,
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        lmbda=lmbda,
        truncation=truncation,
        sampler=sampler,
        sync_every=sync_every,
        engine=engine_placement(
            engine_mode, engine_memory, engine_tensor_parallel, engine_sleep, engine_devices
        ),
        lr=lr,
        save_every=save_every,
        seed=seed,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        fused_loss=fused_loss,
        dtype=dtype,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        log_every=log_every,
        gradient_checkpointing=gradient_checkpointing,
        max_staleness=max_staleness,
    )
    adapters.settings(lora_rank, lora_alpha, seed)  # bad values or no peft: before any record
    console.print(config_table("onpolicy", config))
    train_prompts, _ = prompt_sets(
        prompts, n_prompts, 0 if prompts == EMBEDDED else 1, seed, prompt_column, "answer"
    )
    if Path(teacher_path).is_dir() and not dryrun.pending(student_path):
        refuse_remote_code(teacher_path, trust=trust_remote_code, fix=REMOTE_CODE_FIX)
        teacher_tok = dryrun.tokenizer(teacher_path, "teacher", trust_remote_code, dry_run)
        student_tok = dryrun.tokenizer(student_path, "student", False, dry_run)
        parity.check_conversations(teacher_tok, student_tok)  # the first difference, shown
    if dry_run:
        return dry_onpolicy(config, teacher_path, teacher_backend, teacher_url or [],
                            teacher_max_top_k, train_prompts, force)  # fmt: skip
    prepare(run_dir)
    the_teacher = make_teacher(
        parse_backend(teacher_backend),
        teacher_path,
        teacher_url or [],
        max_top_k=teacher_max_top_k,
        trust_remote_code=trust_remote_code,
        dtype=teacher_dtype,
        n_params=teacher_params,
        max_model_len=teacher_max_model_len,
        concurrency=teacher_concurrency,
    )
    check_request(
        config.top_k, config.lmbda, the_teacher, train_prompts
    )  # before config.json records anything
    record_config(run_dir, "onpolicy", config, force=force)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json", teacher_devices=held)
    with phase_progress() as bars:
        try:
            summary = onpolicy.train(config, the_teacher, train_prompts, ledger, bars.log)
        finally:  # retries are worth seeing most when the run failed
            if faults := teacher_metrics(the_teacher):
                # Under accelerate each process has its own client: one record per rank.
                rank = int(os.environ.get("RANK", "0"))  # set by torchrun
                append_metrics(run_dir, {"phase": "onpolicy.teacher", "rank": rank, **faults})
    # Under `accelerate launch` rank 0 writes the job's ledger, the others their shards of it.
    ledger.save(run_dir / "ledger.json", rank=PartialState().process_index)
    m = summary.metrics
    console.print(
        f"final loss {summary.final_loss:.4f}  kl {m.get('kl', float('nan')):.4f}  "
        f"top-k overlap {m.get('topk_overlap', float('nan')):.2f}  "
        f"truncation {m.get('truncation_rate', float('nan')):.2f}; "
        f"checkpoint {summary.checkpoint}"
    )
