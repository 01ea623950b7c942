"""Options and resolvers shared by the pipeline commands."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer
from transformers import PreTrainedTokenizerBase

from cli import dryrun
from cli.dryrun import check_urls
from cli.render import console
from cli.teacher import AUTO, BACKENDS
from cli.teacher import DEFAULT_BACKEND as DEFAULT_BACKEND  # the commands take it from here
from distill import embedded
from distill.errors import DistillError
from distill.prompts import EMBEDDED, Prompt, embedded_prompts, load_prompts
from students.dtype import HELP as DTYPE_HELP
from students.dtype import TRAIN_HELP, DTypeName, TrainDTypeName
from students.load import resolve_student
from students.placement import COLOCATED_MEMORY, OWN_MEMORY, EngineMode, EnginePlacement
from students.tiny import TINY_SHAPES
from teachers.chat import MODE_CHOICES, MODES, Mode, check_modes, detect_format, modes_for
from teachers.protocol import refuse_remote_code

RunDir = Annotated[Path, typer.Option(help="where everything of this run is written")]
TeacherOpt = Annotated[str, typer.Option(help="'embedded' or a model folder / served name")]
StudentOpt = Annotated[
    str, typer.Option(help="'embedded' or a model folder sharing the teacher's tokenizer")
]
PromptsOpt = Annotated[str, typer.Option(help="'embedded' or a .jsonl/.parquet file")]
BackendOpt = Annotated[
    str,
    typer.Option(
        help=f"teacher backend: {AUTO} (vllm where CUDA GPUs are visible and vLLM is "
        f"installed, else hf), {', '.join(BACKENDS)}"
    ),
]
TeacherMaxLenOpt = Annotated[
    int | None,
    typer.Option(
        help="vllm teacher: cap on its context length (default: the model's "
        "max_position_embeddings; 2,048 on CPU)",
        min=1,
    ),
]
TeacherConcurrencyOpt = Annotated[
    int, typer.Option(help="server teacher: requests in flight over all servers", min=1)
]
UrlOpt = Annotated[
    list[str] | None, typer.Option(help="vLLM server URL (repeatable)", callback=check_urls)
]
ModesOpt = Annotated[
    str,
    typer.Option(
        help="auto (by the chat template: both on Qwen3-style switch, think on always-thinking, "
        "plain without thinking), think, no_think, both or plain"
    ),
]
SoftSwitchOpt = Annotated[
    bool, typer.Option(help="switch modes by /think, /no_think in the user turn")
]
TeacherDtypeOpt = Annotated[
    DTypeName, typer.Option(help=f"the teacher's dtype (hf, vllm backends): {DTYPE_HELP}")
]
DtypeOpt = Annotated[
    TrainDTypeName, typer.Option(help=f"the student's training dtype: {TRAIN_HELP}")
]
GradCheckpointOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="recompute each layer's activations in the backward: far less memory, ~30% slower",
    ),
]
WarmupStepsOpt = Annotated[int, typer.Option(help="steps of linear LR warmup to --lr")]
MinLrRatioOpt = Annotated[
    float,
    typer.Option(help="the cosine decay ends at this share of --lr (1: constant after warmup)"),
]
TeacherParamsOpt = Annotated[
    int,
    typer.Option(
        help="the teacher's parameters in matrix products, for the ledger's FLOPs (2·N per "
        "token); 0: from its config (a local folder or a Qwen3 hub id)",
        min=0,
    ),
]
TeacherGpusOpt = Annotated[
    list[int] | None,
    typer.Option(
        help="GPUs each teacher server holds for the whole run: one value for every "
        "--teacher-url, or one per URL in the same order (none: the teacher is in-process)"
    ),
]


def resolve_models(teacher: str, student: str, dry_run: bool = False) -> tuple[str, str]:
    """'embedded' builds (or reuses) the cached tiny pair; a student may also be a Qwen3 size
    ('8B', '8B-Base'), a hub id, a local folder, or a tiny preset on the teacher's tokenizer.

    A dry run builds nothing: an embedded pair not built yet is returned as its future folders
    (`embedded.cached`), and `dryrun.pending` tells the command to skip checks of those."""
    for option, value in (("--teacher", teacher), ("--student", student)):
        if not value.strip():  # Path("") is the working directory: never a model
            raise DistillError(f"{option} is empty: pass 'embedded', a model folder or a hub id")
    if student not in (EMBEDDED, *TINY_SHAPES):
        student = resolve_student(student)  # fail fast, before a minute of embedded build
    if EMBEDDED in (teacher, student):
        assets, built = embedded.cached()
        if dry_run and not built:
            teacher = str(assets.teacher) if teacher == EMBEDDED else teacher
            student = str(assets.student) if student == EMBEDDED else student
            return teacher, student
        assets = embedded.build(log=lambda s: console.print(f"[dim]{s}[/]"))
        teacher = str(assets.teacher) if teacher == EMBEDDED else teacher
        student = str(assets.student) if student == EMBEDDED else student
    if dry_run and student in TINY_SHAPES:  # built on first use, into the cache: not now
        return teacher, student
    student = resolve_student(
        student,
        tokenizer_from=teacher if Path(teacher).is_dir() else None,
        cache=embedded.cache_root() / "students",
    )
    # Students are trained with transformers' own architectures only: never their shipped code.
    refuse_remote_code(student, trust=False, fix="pick a student of a transformers architecture")
    return teacher, student


def resolve_modes(
    modes: str,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    *,
    soft_switch: bool = False,
    thinking_budget: bool = False,
) -> tuple[Mode, ...]:
    """`--modes` on the template of `tokenizer` (a folder or a loaded tokenizer): its format is
    detected once by rendering probes, and modes, --soft-switch and --thinking-budget it cannot
    honour are refused here, before anything runs."""
    if tokenizer is None:  # no template to ask: Qwen3's modes
        if modes in ("auto", "both"):
            return MODES
        if modes in MODES:
            return modes_for(modes, "switch")
        raise DistillError(f"--modes {modes!r} is not one of {', '.join(MODE_CHOICES)}")
    tok = (
        dryrun.tokenizer(tokenizer, "model's", False, False)
        if isinstance(tokenizer, str)
        else tokenizer
    )
    resolved = modes_for(modes, detect_format(tok))
    fmt = check_modes(resolved, tok, soft_switch=soft_switch, thinking_budget=thinking_budget)
    console.print(f"[dim]chat template format: {fmt}; modes: {', '.join(resolved)}[/]")
    return resolved


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


# Where the student's sampler engine runs on GPUs (students/placement.py, docs/gpu.md).
ENGINE = EnginePlacement()  # the --engine-* options' defaults
EngineModeOpt = Annotated[
    EngineMode,
    typer.Option(
        "--engine-placement",
        help="vLLM sampler on GPUs: colocate (in each rank's process, beside its student) or "
        "own (on --engine-devices)",
    ),
]
EngineMemoryOpt = Annotated[
    float | None,
    typer.Option(
        help=f"share of each GPU the vLLM sampler takes (default: {COLOCATED_MEMORY} colocated, "
        f"{OWN_MEMORY} on its own GPUs)"
    ),
]
EngineTpOpt = Annotated[
    int, typer.Option("--engine-tensor-parallel", help="GPUs per vLLM sampler engine", min=1)
]
EngineSleepOpt = Annotated[
    bool,
    typer.Option(
        "--engine-sleep/--no-engine-sleep",
        help="colocated: the vLLM sampler gives its GPU memory back while the student trains",
    ),
]
EngineDevicesOpt = Annotated[
    str,
    typer.Option(help="--engine-placement own: the engines' GPUs, e.g. 4,5,6,7 (T per rank)"),
]


def engine_placement(
    mode: EngineMode, memory: float | None, tp: int, sleep: bool, devices: str
) -> EnginePlacement:
    """The --engine-* options as one placement (checked by EnginePlacement itself)."""
    try:
        gpus = tuple(int(d) for d in devices.split(",") if d.strip())
    except ValueError:
        raise DistillError(
            f"--engine-devices {devices!r} is not a list of GPU indices: pass e.g. 4,5,6,7"
        ) from None
    return EnginePlacement(
        mode=mode, gpu_memory_utilization=memory, tensor_parallel_size=tp, sleep=sleep,
        devices=gpus,
    )  # fmt: skip
