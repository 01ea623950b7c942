"""`distill rl`: the RL baseline (GRPO, verifiable reward) metered by the same GpuLedger.

distill rl --run-dir runs/rl --student runs/default/offpolicy/checkpoint
distill rl --run-dir runs/rl --student S --sampler vllm --sync-every 1 --lora-rank 16
distill report compare runs/default runs/rl --baseline runs/rl
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli import dryrun
from cli.offpolicy import FusedLossOpt, LoraAlphaOpt, LoraRankOpt
from cli.onpolicy import SamplerOpt, SyncEveryOpt
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.report import render_run
from cli.resolve import (
    ENGINE,
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
    WarmupStepsOpt,
    engine_placement,
    prompt_sets,
    resolve_models,
    resolve_modes,
)
from cli.root import app
from distill import adapters, evaluate
from distill.accounting import GpuLedger
from distill.manifest import fingerprint
from distill.prompts import EMBEDDED
from distill.rl import train as rl
from distill.rundir import atomic_write_json, prepare, record_config


@app.command("rl")
@user_errors
def rl_cmd(
    run_dir: RunDir,
    student: Annotated[
        str,
        typer.Option(
            help="'embedded' or a model folder; for a fair comparison, the "
            "off-policy checkpoint on-policy distillation starts from"
        ),
    ] = EMBEDDED,
    prompts: PromptsOpt = EMBEDDED,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    n_prompts: Annotated[int, typer.Option(help="training prompts")] = 256,
    eval_prompts: Annotated[int, typer.Option(help="held-out prompts")] = evaluate.Config.prompts,
    steps: int = rl.Config.steps,
    prompts_per_step: int = rl.Config.prompts_per_step,
    samples_per_prompt: Annotated[
        int, typer.Option(help="G: responses per prompt")
    ] = rl.Config.samples_per_prompt,
    modes: ModesOpt = "auto",
    soft_switch: SoftSwitchOpt = rl.Config.soft_switch,
    max_tokens: Annotated[int, typer.Option(help="response length limit")] = (rl.Config.max_tokens),
    format_weight: Annotated[
        float, typer.Option(help="reward for a well-formed response")
    ] = rl.Config.format_weight,
    scale_by_std: Annotated[
        bool, typer.Option(help="GRPO std scaling (--no-scale-by-std: Dr. GRPO)")
    ] = rl.Config.scale_by_std,
    lr: float = rl.Config.lr,
    eval_every: Annotated[
        int, typer.Option(help="evaluate every N steps (0: before and after only)")
    ] = rl.Config.eval_every,
    save_every: int = rl.Config.save_every,
    seed: int = rl.Config.seed,
    force: Annotated[bool, typer.Option(help="overwrite a run dir holding another config")] = False,
    sampler: SamplerOpt = rl.Config.sampler,
    sync_every: SyncEveryOpt = rl.Config.sync_every,
    engine_mode: EngineModeOpt = ENGINE.mode,
    engine_memory: EngineMemoryOpt = ENGINE.gpu_memory_utilization,
    engine_tensor_parallel: EngineTpOpt = ENGINE.tensor_parallel_size,
    engine_sleep: EngineSleepOpt = ENGINE.sleep,
    engine_devices: EngineDevicesOpt = "",
    lora_rank: LoraRankOpt = rl.Config.lora_rank,
    lora_alpha: LoraAlphaOpt = rl.Config.lora_alpha,
    fused_loss: FusedLossOpt = rl.Config.fused_loss,
    dtype: DtypeOpt = rl.Config.dtype,
    warmup_steps: WarmupStepsOpt = rl.Config.warmup_steps,
    min_lr_ratio: MinLrRatioOpt = rl.Config.min_lr_ratio,
    log_every: Annotated[int, typer.Option(help="steps between metrics.jsonl lines")] = (
        rl.Config.log_every
    ),
    gradient_checkpointing: GradCheckpointOpt = rl.Config.gradient_checkpointing,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    """GRPO on the student with answer-correctness reward; device-hours by the same meter."""
    run_dir = dryrun.run_dir_for(run_dir)
    _, student_path = resolve_models(student, student, dry_run)  # only the student is needed
    train_prompts, held = prompt_sets(
        prompts, n_prompts, eval_prompts, seed, prompt_column, answer_column
    )
    config = rl.Config(
        run_dir=run_dir,
        student=student_path,
        steps=steps,
        prompts_per_step=prompts_per_step,
        samples_per_prompt=samples_per_prompt,
        modes=resolve_modes(
            modes,
            None if dryrun.pending(student_path) else student_path,
            soft_switch=soft_switch,
        ),
        soft_switch=soft_switch,
        max_tokens=max_tokens,
        format_weight=format_weight,
        scale_by_std=scale_by_std,
        lr=lr,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        sampler=sampler,
        sync_every=sync_every,
        engine=engine_placement(
            engine_mode, engine_memory, engine_tensor_parallel, engine_sleep, engine_devices
        ),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        fused_loss=fused_loss,
        dtype=dtype,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        log_every=log_every,
        gradient_checkpointing=gradient_checkpointing,
    )
    rl.check_request(config, train_prompts)  # before config.json records anything
    adapters.settings(lora_rank, lora_alpha, seed)  # bad values or no peft: before any record
    # the same evaluation settings as `distill run`, so `report compare` finds the same eval set
    eval_config = evaluate.Config(
        prompts=eval_prompts, max_tokens=max_tokens, seed=seed + 1, soft_switch=soft_switch
    )
    console.print(config_table("rl", config))
    if dry_run:
        if not dryrun.pending(student_path):
            dryrun.tokenizer(student_path, "student")
        record_config(run_dir, "rl", config, force=force, write=False)
        record_config(run_dir, "eval", eval_config, force=force, write=False)
        return dryrun.finish([
            f"load the student {student_path}",
            f"{steps} GRPO steps of {prompts_per_step} prompts x {samples_per_prompt} "
            f"responses from {len(train_prompts)} training prompts; evaluate on {len(held)}",
            f"checkpoint every {save_every} steps to {run_dir / config.output}",
        ])  # fmt: skip
    prepare(run_dir)
    record_config(run_dir, "rl", config, force=force)
    record_config(run_dir, "eval", eval_config, force=force)
    atomic_write_json(
        run_dir / "eval_set.json", {"prompts": len(held), "fingerprint": fingerprint(held)}
    )
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
    with phase_progress() as bars:
        # the loop saves the job's ledger (merged over processes) with each checkpoint
        summary = rl.train(config, train_prompts, held, eval_config, ledger, bars.log)
    console.print(f"final reward {summary.final_reward:.3f}; checkpoint {summary.checkpoint}")
    render_run(run_dir)
