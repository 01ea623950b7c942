"""`distill generate` and `distill offpolicy`: teacher data, then fine-tuning on it.

distill generate --run-dir runs/x --prompts data.jsonl --modes both
distill offpolicy --run-dir runs/x --student S
"""

from __future__ import annotations

from typing import Annotated

import typer
from transformers import AutoTokenizer

from cli.app import app
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.report import verdict_table
from cli.resolve import (
    BackendOpt,
    ModesOpt,
    PromptsOpt,
    RunDir,
    StudentOpt,
    TeacherOpt,
    UrlOpt,
    prompt_sets,
    resolve_models,
    resolve_modes,
)
from cli.teacher import make_teacher
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.offpolicy import generate as gen
from distill.offpolicy import train as offpolicy
from distill.prompts import EMBEDDED, load_prompts
from distill.rundir import prepare, record_config


@app.command()
@user_errors
def generate(
    run_dir: RunDir,
    teacher: TeacherOpt = EMBEDDED,
    student: StudentOpt = EMBEDDED,
    prompts: PromptsOpt = EMBEDDED,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    n_prompts: int = 256,
    modes: ModesOpt = "both",
    samples_per_prompt: int = gen.Config.samples_per_prompt,
    max_tokens: int = gen.Config.max_tokens,
    thinking_budget: int | None = None,
    store_topk: Annotated[int, typer.Option(help="also store the teacher's top-k (0: off)")] = 0,
    max_prompt_tokens: int = gen.Config.max_prompt_tokens,
    overlong: Annotated[
        str, typer.Option(help="prompts over the limit: drop or truncate")
    ] = "drop",
    teacher_backend: BackendOpt = "hf",
    teacher_url: UrlOpt = None,
    seed: int = 0,
    force: bool = False,
) -> None:
    """The teacher answers the prompts; responses are filtered and written as parquet shards."""
    run_dir = prepare(run_dir)
    teacher_path, _ = resolve_models(teacher, student)
    if overlong not in ("drop", "truncate"):
        raise DistillError(f"--overlong {overlong!r}: choose drop or truncate")
    config = gen.Config(
        run_dir=run_dir,
        modes=resolve_modes(modes),
        samples_per_prompt=samples_per_prompt,
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        store_topk=store_topk,
        max_prompt_tokens=max_prompt_tokens,
        overlong=overlong,
        seed=seed,
    )
    console.print(config_table("generate", config))
    record_config(run_dir, "generate", config, force=force)
    rows, _ = (
        prompt_sets(prompts, n_prompts, 0, seed, prompt_column, answer_column)
        if prompts == EMBEDDED
        else (
            load_prompts(
                prompts, prompt_column=prompt_column, answer_column=answer_column, limit=n_prompts
            ),
            None,
        )
    )
    the_teacher = make_teacher(
        teacher_backend, teacher_path, teacher_url or [], max_top_k=store_topk or None
    )  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
    with phase_progress() as bars:
        summary = gen.generate(config, the_teacher, tokenizer, rows, ledger, bars.step)
    ledger.save(run_dir / "ledger.json")
    console.print(verdict_table(summary))


@app.command("offpolicy")
@user_errors
def offpolicy_cmd(
    run_dir: RunDir,
    student: StudentOpt = EMBEDDED,
    steps: int = offpolicy.Config.steps,
    batch_size: int = offpolicy.Config.batch_size,
    micro_batch_size: int = offpolicy.Config.micro_batch_size,
    lr: float = offpolicy.Config.lr,
    warmup_steps: int = offpolicy.Config.warmup_steps,
    kd_weight: float = offpolicy.Config.kd_weight,
    seed: int = 0,
    force: bool = False,
) -> None:
    """Fine-tune the student on the kept teacher responses in RUN_DIR/teacher_data."""
    run_dir = prepare(run_dir)
    _, student_path = resolve_models(EMBEDDED if student == EMBEDDED else student, student)
    config = offpolicy.Config(
        run_dir=run_dir,
        student=student_path,
        steps=steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        kd_weight=kd_weight,
        seed=seed,
    )
    console.print(config_table("offpolicy", config))
    record_config(run_dir, "offpolicy", config, force=force)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
    with phase_progress() as bars:
        summary = offpolicy.train(config, ledger, bars.log)
    ledger.save(run_dir / "ledger.json")
    console.print(f"final loss {summary.final_loss:.4f}; checkpoint {summary.checkpoint}")
