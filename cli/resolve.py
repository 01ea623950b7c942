"""Options and resolvers shared by the pipeline commands."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer

from cli.render import console
from cli.teacher import BACKENDS
from distill import embedded
from distill.errors import DistillError
from distill.prompts import EMBEDDED, Prompt, embedded_prompts, load_prompts
from students.dtype import HELP as DTYPE_HELP
from students.load import resolve_student
from students.tiny import TINY_SHAPES
from teachers.chat import MODES, Mode
from teachers.protocol import refuse_remote_code

RunDir = Annotated[Path, typer.Option(help="where everything of this run is written")]
TeacherOpt = Annotated[str, typer.Option(help="'embedded' or a model folder / served name")]
StudentOpt = Annotated[
    str, typer.Option(help="'embedded' or a model folder sharing the teacher's tokenizer")
]
PromptsOpt = Annotated[str, typer.Option(help="'embedded' or a .jsonl/.parquet file")]
BackendOpt = Annotated[str, typer.Option(help=f"teacher backend: {', '.join(BACKENDS)}")]
UrlOpt = Annotated[list[str] | None, typer.Option(help="vLLM server URL (repeatable)")]
ModesOpt = Annotated[str, typer.Option(help="think, no_think, or both")]
TeacherDtypeOpt = Annotated[
    str, typer.Option(help=f"the teacher's dtype (hf, vllm backends): {DTYPE_HELP}")
]
DtypeOpt = Annotated[str, typer.Option(help=f"the student's training dtype: {DTYPE_HELP}")]
GradCheckpointOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="recompute each layer's activations in the backward: far less memory, ~30% slower",
    ),
]
TeacherParamsOpt = Annotated[
    int,
    typer.Option(
        help="the teacher's parameters in matrix products, for the ledger's FLOPs (2·N per "
        "token); 0: from its config (a local folder or a Qwen3 hub id)"
    ),
]
TeacherGpusOpt = Annotated[
    int, typer.Option(help="GPUs a remote teacher holds for the whole run (0: in-process)")
]


def resolve_models(teacher: str, student: str) -> tuple[str, str]:
    """'embedded' builds (or reuses) the cached tiny pair; a student may also be a Qwen3 size
    ('8B', '8B-Base'), a hub id, a local folder, or a tiny preset on the teacher's tokenizer."""
    if student not in (EMBEDDED, *TINY_SHAPES):
        student = resolve_student(student)  # fail fast, before a minute of embedded build
    if EMBEDDED in (teacher, student):
        assets = embedded.build(log=lambda s: console.print(f"[dim]{s}[/]"))
        teacher = str(assets.teacher) if teacher == EMBEDDED else teacher
        student = str(assets.student) if student == EMBEDDED else student
    student = resolve_student(
        student,
        tokenizer_from=teacher if Path(teacher).is_dir() else None,
        cache=embedded.cache_root() / "students",
    )
    # Students are trained with transformers' own architectures only: never their shipped code.
    refuse_remote_code(student, trust=False, fix="pick a student of a transformers architecture")
    return teacher, student


def resolve_modes(modes: str) -> tuple[Mode, ...]:
    if modes == "both":
        return MODES
    if modes in MODES:
        return (modes,)  # type: ignore[return-value]
    raise DistillError(f"--modes {modes!r} is not one of think, no_think, both")


def prompt_sets(
    source: str, n: int, n_eval: int, seed: int, prompt_column: str, answer_column: str
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) prompts; a file is split by a seeded shuffle, held-out first."""
    if source == EMBEDDED:
        return embedded_prompts(n, seed, "train"), embedded_prompts(n_eval, seed, "eval")
    rows = load_prompts(source, prompt_column=prompt_column, answer_column=answer_column)
    random.Random(seed).shuffle(rows)
    if len(rows) <= n_eval:
        raise DistillError(
            f"{source} has {len(rows)} prompts, not more than --eval-prompts {n_eval}: "
            "lower --eval-prompts or add prompts"
        )
    return rows[n_eval : n_eval + n], rows[:n_eval]
