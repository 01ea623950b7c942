"""`distill onpolicy`: the student samples, the teacher scores, the student minimises a divergence.

distill onpolicy --run-dir runs/x --teacher T        # from RUN_DIR/offpolicy/checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from transformers import AutoTokenizer

from cli.app import app
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.resolve import (
    BackendOpt,
    ModesOpt,
    PromptsOpt,
    RunDir,
    TeacherOpt,
    UrlOpt,
    prompt_sets,
    resolve_models,
    resolve_modes,
)
from cli.teacher import make_teacher
from distill import pipeline
from distill.accounting import GpuLedger
from distill.onpolicy import train as onpolicy
from distill.prompts import EMBEDDED
from distill.rundir import prepare, record_config


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
    steps: int = onpolicy.Config.steps,
    prompts_per_step: int = onpolicy.Config.prompts_per_step,
    samples_per_prompt: int = onpolicy.Config.samples_per_prompt,
    modes: ModesOpt = "both",
    max_tokens: int = onpolicy.Config.max_tokens,
    top_k: int = onpolicy.Config.top_k,
    divergence: str = onpolicy.Config.divergence,
    lr: float = onpolicy.Config.lr,
    teacher_backend: BackendOpt = "hf",
    teacher_url: UrlOpt = None,
    seed: int = 0,
    force: bool = False,
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
        modes=resolve_modes(modes),
        max_tokens=max_tokens,
        top_k=top_k,
        divergence=divergence,
        lr=lr,
        seed=seed,  # type: ignore[arg-type]
    )
    console.print(config_table("onpolicy", config))
    record_config(run_dir, "onpolicy", config, force=force)
    train_prompts, _ = prompt_sets(
        prompts, n_prompts, 0 if prompts == EMBEDDED else 1, seed, prompt_column, "answer"
    )
    the_teacher = make_teacher(teacher_backend, teacher_path, teacher_url or [], max_top_k=top_k)  # type: ignore[arg-type]
    if Path(teacher_path).is_dir():
        pipeline.check_parity(AutoTokenizer.from_pretrained(teacher_path), student_path)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
    with phase_progress() as bars:
        summary = onpolicy.train(config, the_teacher, train_prompts, ledger, bars.log)
    ledger.save(run_dir / "ledger.json")
    console.print(f"final loss {summary.final_loss:.4f}; checkpoint {summary.checkpoint}")
