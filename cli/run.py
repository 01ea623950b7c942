"""`distill run`: the whole pipeline (teacher data -> off-policy -> on-policy -> report).

distill run                                   # embedded default, CPU, a few minutes
distill run --teacher T --student S --prompts data.jsonl --teacher-backend vllm
distill run --student 8B --lora-rank 16      # both stages train LoRA adapters, checkpoints merged
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import dryrun
from cli.offpolicy import FusedLossOpt, LoraAlphaOpt, LoraRankOpt
from cli.onpolicy import MaxStalenessOpt
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.report import render_run
from cli.resolve import (
    DEFAULT_BACKEND,
    BackendOpt,
    ModesOpt,
    PromptsOpt,
    RunDir,
    SoftSwitchOpt,
    StudentOpt,
    TeacherConcurrencyOpt,
    TeacherDtypeOpt,
    TeacherGpusOpt,
    TeacherMaxLenOpt,
    TeacherOpt,
    TeacherParamsOpt,
    UrlOpt,
    prompt_sets,
    resolve_models,
    resolve_modes,
)
from cli.root import app
from cli.teacher import make_teacher, parse_backend, teacher_devices
from distill import adapters, evaluate, parity, pipeline
from distill.offpolicy import generate as gen
from distill.offpolicy import train as offpolicy
from distill.onpolicy import train as onpolicy
from distill.onpolicy.rollout import check_top_k
from distill.prompts import EMBEDDED
from distill.rundir import prepare, record_config
from teachers.server import ServerConfig


@app.command()
@user_errors
def run(
    run_dir: RunDir = Path("runs/default"),
    teacher: TeacherOpt = EMBEDDED,
    student: StudentOpt = EMBEDDED,
    prompts: PromptsOpt = EMBEDDED,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    n_prompts: Annotated[int, typer.Option(help="training prompts")] = pipeline.RECIPE.n_prompts,
    eval_prompts: Annotated[int, typer.Option(help="held-out prompts")] = (
        pipeline.RECIPE.eval_prompts
    ),
    modes: ModesOpt = "auto",
    soft_switch: SoftSwitchOpt = onpolicy.Config.soft_switch,
    max_tokens: Annotated[int, typer.Option(help="response length limit")] = (
        pipeline.RECIPE.max_tokens
    ),
    thinking_budget: Annotated[
        int | None, typer.Option(help="thinking tokens before the stop sentence")
    ] = None,
    offpolicy_steps: int = pipeline.RECIPE.offpolicy_steps,
    offpolicy_batch_size: int = pipeline.RECIPE.offpolicy_batch_size,
    offpolicy_lr: float = pipeline.RECIPE.offpolicy_lr,
    onpolicy_steps: int = pipeline.RECIPE.onpolicy_steps,
    onpolicy_lr: float = onpolicy.Config.lr,
    top_k: Annotated[
        int, typer.Option(help="teacher log-probs per position")
    ] = onpolicy.Config.top_k,
    divergence: Annotated[
        onpolicy.Divergence, typer.Option(help="on-policy divergence")
    ] = onpolicy.Config.divergence,
    teacher_backend: BackendOpt = DEFAULT_BACKEND,
    teacher_url: UrlOpt = None,
    teacher_max_model_len: TeacherMaxLenOpt = None,
    teacher_concurrency: TeacherConcurrencyOpt = ServerConfig.concurrency,
    teacher_gpus: TeacherGpusOpt = None,
    seed: int = onpolicy.Config.seed,
    lora_rank: LoraRankOpt = offpolicy.Config.lora_rank,
    lora_alpha: LoraAlphaOpt = offpolicy.Config.lora_alpha,
    fused_loss: FusedLossOpt = offpolicy.Config.fused_loss,
    force: Annotated[bool, typer.Option(help="overwrite a run dir holding another config")] = False,
    teacher_dtype: TeacherDtypeOpt = "auto",
    teacher_params: TeacherParamsOpt = 0,
    dry_run: dryrun.DryRunOpt = False,
    max_staleness: MaxStalenessOpt = onpolicy.Config.max_staleness,
) -> None:
    """Teacher data in both modes -> off-policy -> on-policy -> device-hour report."""
    run_dir = dryrun.run_dir_for(run_dir)
    teacher_path, student_path = resolve_models(teacher, student, dry_run)
    template_from = teacher_path if Path(teacher_path).is_dir() else student_path
    mode_tuple = resolve_modes(
        modes,
        None if dryrun.pending(template_from) else template_from,  # not built: Qwen3's modes
        soft_switch=soft_switch,
        thinking_budget=thinking_budget is not None,
    )
    train_prompts, held = prompt_sets(
        prompts, n_prompts, eval_prompts, seed, prompt_column, answer_column
    )
    gen_config = gen.Config(
        run_dir=run_dir,
        modes=mode_tuple,
        soft_switch=soft_switch,
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        seed=seed,
    )
    off_config = offpolicy.Config(
        run_dir=run_dir,
        student=student_path,
        steps=offpolicy_steps,
        batch_size=offpolicy_batch_size,
        micro_batch_size=min(offpolicy_batch_size, 64),
        lr=offpolicy_lr,
        seed=seed,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        fused_loss=fused_loss,
    )
    on_config = onpolicy.Config(
        run_dir=run_dir,
        student=str(run_dir / "offpolicy" / "checkpoint"),
        steps=onpolicy_steps,
        lr=onpolicy_lr,
        modes=mode_tuple,
        soft_switch=soft_switch,
        max_tokens=max_tokens,
        top_k=top_k,
        divergence=divergence,
        seed=seed,
        lora_rank=lora_rank,  # fresh adapters on the merged off-policy checkpoint
        lora_alpha=lora_alpha,
        fused_loss=fused_loss,
        max_staleness=max_staleness,
    )
    adapters.settings(lora_rank, lora_alpha, seed)  # bad values or no peft: before any record
    eval_config = evaluate.Config(
        prompts=eval_prompts, top_k=top_k, max_tokens=max_tokens, seed=seed + 1,
        soft_switch=soft_switch,
    )  # fmt: skip
    for title, cfg in (
        ("generate", gen_config),
        ("offpolicy", off_config),
        ("onpolicy", on_config),
    ):
        console.print(config_table(title, cfg))
    if dry_run:
        if not dryrun.pending(teacher_path) and not dryrun.pending(student_path):
            limit = dryrun.teacher_limit(
                parse_backend(teacher_backend), teacher_path, teacher_url or [], top_k
            )
            check_top_k(top_k, limit, teacher_path)
            tok = dryrun.tokenizer(teacher_path if Path(teacher_path).is_dir() else student_path,
                                   "teacher")  # fmt: skip
            gen.check_inputs(gen_config, teacher_path, limit, tok, train_prompts)
            parity.check_conversations(tok, dryrun.tokenizer(student_path, "student"))
        for name, cfg in (("generate", gen_config), ("offpolicy", off_config),
                          ("onpolicy", on_config), ("eval", eval_config)):  # fmt: skip
            record_config(run_dir, name, cfg, force=force, write=False)
        return dryrun.finish([
            f"teacher {teacher_path} ({teacher_backend}) answers {len(train_prompts)} prompts",
            f"off-policy: {offpolicy_steps} steps on the student {student_path}",
            f"on-policy: {onpolicy_steps} steps ({divergence}), then evaluation on "
            f"{len(held)} held-out prompts and the report, all in {run_dir}",
        ])  # fmt: skip
    prepare(run_dir)
    the_teacher = make_teacher(
        parse_backend(teacher_backend),
        teacher_path,
        teacher_url or [],
        max_top_k=top_k,
        dtype=teacher_dtype,
        n_params=teacher_params,
        max_model_len=teacher_max_model_len,
        concurrency=teacher_concurrency,
    )
    teacher_tok = dryrun.tokenizer(
        teacher_path if Path(teacher_path).is_dir() else student_path, "teacher", False, False
    )
    with phase_progress() as bars:
        pipeline.run(
            run_dir=run_dir,
            teacher=the_teacher,
            teacher_tokenizer=teacher_tok,
            student=student_path,
            train_prompts=train_prompts,
            eval_prompts=held,
            gen_config=gen_config,
            off_config=off_config,
            on_config=on_config,
            eval_config=eval_config,
            force=force,
            log=bars.log,
            progress=bars.step,
            announce=lambda s: console.print(f"[bold cyan]>[/] {s}"),
            teacher_devices=teacher_devices(teacher_gpus, teacher_url) or 0,
        )
    render_run(run_dir)
