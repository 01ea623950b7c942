"""`distill generate` and `distill offpolicy`: teacher data, then fine-tuning on it.

distill generate --run-dir runs/x --prompts data.jsonl --modes both --samples-per-prompt 2
distill generate --run-dir runs/x --prompts data.jsonl --think-ratio 0.75 --store-topk 20
distill offpolicy --run-dir runs/x --student S
distill offpolicy --run-dir runs/x --student S --lora-rank 16   # adapters only, merged checkpoint
accelerate launch --config_file configs/accelerate/ddp.yaml "$(which distill)" offpolicy \\
    --run-dir runs/x --student S
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer
from accelerate import PartialState
from rich.table import Table

from cli import dryrun
from cli.progress import phase_progress
from cli.render import config_table, console, user_errors
from cli.resolve import (
    DEFAULT_BACKEND,
    BackendOpt,
    DtypeOpt,
    GradCheckpointOpt,
    MinLrRatioOpt,
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
    WarmupStepsOpt,
    resolve_models,
    resolve_modes,
)
from cli.root import app
from cli.teacher import make_teacher, parse_backend, teacher_devices, teacher_metrics
from distill import adapters, checkpoint
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.offpolicy import generate as gen
from distill.offpolicy import train as offpolicy
from distill.prompts import EMBEDDED, Prompt, embedded_prompts, load_prompts
from distill.rundir import append_metrics, prepare, record_config
from distill.teacher_data import VERDICTS
from teachers.chat import MODES
from teachers.hf import REMOTE_CODE_FIX
from teachers.protocol import refuse_remote_code
from teachers.server import ServerConfig

LoraRankOpt = Annotated[
    int, typer.Option(help="train rank-r LoRA adapters on a frozen student (0: every weight)")
]
LoraAlphaOpt = Annotated[
    int | None, typer.Option(help="LoRA scale = alpha / rank (default: alpha = 2 x rank)")
]
FusedLossOpt = Annotated[
    bool,
    typer.Option(
        "--fused-loss/--no-fused-loss",
        help="loss from hidden states in chunks, no (B, T, V) logits; falls back where inexact",
    ),
]


def filter_table(summary: gen.Summary) -> Table:
    """Per mode: responses, what each filter removed (first failed check), and what was kept."""
    table = Table(title=f"Teacher responses: {summary.kept} of {summary.rows} kept")
    table.add_column("mode")
    table.add_column("responses", justify="right")
    for v in VERDICTS[1:]:
        table.add_column(f"{v}", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("kept %", justify="right")
    totals = dict.fromkeys(VERDICTS, 0)
    for mode, counts in sorted(summary.by_verdict.items()):
        n = sum(counts.values())
        for v in VERDICTS:
            totals[v] += counts.get(v, 0)
        table.add_row(
            mode,
            str(n),
            *(str(counts.get(v, 0)) for v in VERDICTS[1:]),
            str(counts.get("kept", 0)),
            f"{100 * counts.get('kept', 0) / max(n, 1):.1f}",
        )
    table.add_row(
        "[bold]all",
        f"[bold]{summary.rows}",
        *(f"[bold]{totals[v]}" for v in VERDICTS[1:]),
        f"[bold]{summary.kept}",
        f"[bold]{100 * summary.kept / max(summary.rows, 1):.1f}",
    )
    return table


@app.command()
@user_errors
def generate(
    run_dir: RunDir,
    teacher: TeacherOpt = EMBEDDED,
    prompts: PromptsOpt = EMBEDDED,
    prompt_column: str = "prompt",
    answer_column: Annotated[
        str, typer.Option(help="reference answers for verification (skipped when absent)")
    ] = "answer",
    n_prompts: Annotated[
        int | None, typer.Option(help="use the first N prompts (embedded: 256; file: all)")
    ] = None,
    modes: ModesOpt = "auto",
    think_ratio: Annotated[
        float | None, typer.Option(help="share of prompts answered in think mode, one mode each")
    ] = None,
    soft_switch: SoftSwitchOpt = gen.Config.soft_switch,
    samples_per_prompt: int = gen.Config.samples_per_prompt,
    max_tokens: Annotated[int, typer.Option(help="response length limit")] = gen.Config.max_tokens,
    thinking_budget: Annotated[
        int | None, typer.Option(help="thinking tokens before the stop sentence is forced")
    ] = None,
    store_topk: Annotated[
        int, typer.Option(help="also store the teacher's top-k (0: off)")
    ] = gen.Config.store_topk,
    max_prompt_tokens: int = gen.Config.max_prompt_tokens,
    overlong: Annotated[
        gen.Overlong, typer.Option(help="prompts over --max-prompt-tokens: drop or truncate")
    ] = gen.Config.overlong,
    repetition_threshold: Annotated[
        float, typer.Option(help="repeated 4-gram share above which a response is dropped")
    ] = gen.Config.repetition_threshold,
    shard_size: Annotated[
        int, typer.Option(help="responses per shard (the unit redone after a kill)")
    ] = gen.Config.shard_size,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer folder (default: the teacher's folder)")
    ] = None,
    teacher_backend: BackendOpt = DEFAULT_BACKEND,
    teacher_url: UrlOpt = None,
    teacher_max_model_len: TeacherMaxLenOpt = None,
    teacher_concurrency: TeacherConcurrencyOpt = ServerConfig.concurrency,
    seed: int = gen.Config.seed,
    force: Annotated[
        bool, typer.Option(help="replace data of another teacher/config (kept as .replaced-N)")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="run Python code shipped in the teacher's folder (auto_map)")
    ] = False,
    teacher_dtype: TeacherDtypeOpt = "auto",
    teacher_params: TeacherParamsOpt = 0,
    teacher_gpus: TeacherGpusOpt = None,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    """The teacher answers the prompts; responses are filtered and written as parquet shards."""
    held = teacher_devices(teacher_gpus, teacher_url)  # teacher.reserved: every server's GPUs
    run_dir = dryrun.run_dir_for(run_dir)
    teacher_path = (
        resolve_models(EMBEDDED, EMBEDDED, dry_run)[0] if teacher == EMBEDDED else teacher
    )
    config = gen.Config(
        run_dir=run_dir,
        modes=MODES,  # resolved below, once the template is loaded (`--modes auto`)
        think_ratio=think_ratio,
        soft_switch=soft_switch,
        samples_per_prompt=samples_per_prompt,
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        store_topk=store_topk,
        max_prompt_tokens=max_prompt_tokens,
        overlong=overlong,
        repetition_threshold=repetition_threshold,
        shard_size=shard_size,
        seed=seed,
    )
    gen.check_config(config)
    if prompts == EMBEDDED:
        rows = embedded_prompts(n_prompts or 256, seed, "train")
    else:
        rows = load_prompts(
            prompts, prompt_column=prompt_column, answer_column=answer_column, limit=n_prompts
        )
    if dry_run:
        return dry_generate(config, modes, teacher_path, teacher_backend, teacher_url, tokenizer,
                            trust_remote_code, rows, force)  # fmt: skip
    prepare(run_dir)
    if teacher_backend != "server" and not Path(teacher_path).is_dir():
        raise DistillError(
            f"teacher {teacher_path!r} is not a model folder: pass a folder written by "
            "save_pretrained (config.json + safetensors + tokenizer), or 'embedded'"
        )
    for folder in (tokenizer, teacher_path):
        if folder is not None:
            refuse_remote_code(folder, trust=trust_remote_code, fix=REMOTE_CODE_FIX)
    tok = dryrun.tokenizer(tokenizer or teacher_path, "teacher", trust_remote_code, False)
    resolved = resolve_modes(
        modes, tok, soft_switch=soft_switch, thinking_budget=thinking_budget is not None
    )
    config = replace(config, modes=resolved)
    gen.check_config(config)  # --think-ratio needs both modes
    console.print(config_table("generate", config))
    the_teacher = make_teacher(
        parse_backend(teacher_backend),
        teacher_path,
        teacher_url or [],
        max_top_k=store_topk or None,
        trust_remote_code=trust_remote_code,
        dtype=teacher_dtype,
        n_params=teacher_params,
        max_model_len=teacher_max_model_len,
        concurrency=teacher_concurrency,
    )
    record_config(run_dir, "generate", config, force=force)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json", teacher_devices=held)
    with phase_progress() as bars:
        try:
            summary = gen.generate(config, the_teacher, tok, rows, ledger, bars.step, force=force)
        finally:  # retries are worth seeing most when the run failed
            if faults := teacher_metrics(the_teacher):
                append_metrics(run_dir, {"phase": "generate", **faults})
    ledger.save(run_dir / "ledger.json")
    console.print(filter_table(summary))
    limit = f"--max-prompt-tokens {config.max_prompt_tokens}"
    if summary.dropped_prompts:
        console.print(f"dropped {summary.dropped_prompts} prompts longer than {limit}")
    if summary.truncated_prompts:
        console.print(f"truncated {summary.truncated_prompts} prompts to {limit}")
    console.print(
        f"{summary.shards_written} shards written, {summary.shards_skipped} already finished; "
        f"data: {run_dir / config.output}"
    )
    gen.check_usable(summary)


def dry_generate(
    config: gen.Config,
    modes: str,
    teacher: str,
    backend: str,
    urls: list[str] | None,
    tokenizer: str | None,
    trust_remote_code: bool,
    rows: list[Prompt],
    force: bool,
) -> None:
    """`distill generate --dry-run`: the checks of a real run, up to the first response."""
    name = teacher
    budget = config.thinking_budget is not None
    if not dryrun.pending(teacher):
        limit = dryrun.teacher_limit(
            parse_backend(backend), teacher, urls or [], config.store_topk or None
        )
        tok = dryrun.tokenizer(tokenizer or teacher, "teacher", trust_remote_code)
        resolved = resolve_modes(modes, tok, soft_switch=config.soft_switch, thinking_budget=budget)
        config = replace(config, modes=resolved)
        gen.check_config(config)
        gen.check_inputs(config, teacher, limit, tok, rows)
        name = f"{teacher} ({backend})"
    else:  # the embedded pair, not built yet: its template is Qwen3's (modes think, no_think)
        config = replace(config, modes=resolve_modes(modes))
    console.print(config_table("generate", config))
    record_config(config.run_dir, "generate", config, force=force, write=False)
    shown = "one mode each" if config.think_ratio is not None else " and ".join(config.modes)
    dryrun.finish([
        *(["build the embedded teacher (once, 2-3 CPU-minutes)"] if name == teacher else []),
        f"teacher {name} answers {len(rows)} prompts ({shown}), "
        f"{config.samples_per_prompt} sample(s) each, up to {config.max_tokens} tokens",
        f"filter, write shards of {config.shard_size} to {config.run_dir / config.output}",
    ])  # fmt: skip


def dry_offpolicy(config: offpolicy.Config, force: bool) -> None:
    """`distill offpolicy --dry-run`: trackers, student tokenizer and head, the teacher data."""
    offpolicy.trackers(config)
    data_dir = config.data_dir or config.run_dir / "teacher_data"
    resume = checkpoint.latest(config.run_dir / config.output / "checkpoint")
    source = str(resume) if resume else config.student
    n = "the"
    if not dryrun.pending(source):
        tok = dryrun.tokenizer(source, "student")
        width = dryrun.model_config(source, "student").get("vocab_size")
        if isinstance(width, int) and width < len(tok):
            raise DistillError(
                f"model {source} has {width} output rows but its tokenizer {len(tok)} ids: use "
                "a folder whose config vocab_size covers its tokenizer"
            )
        n = str(len(offpolicy.checked_examples(config, data_dir, tok)))
    elif not data_dir.is_dir():
        raise DistillError(f"no teacher data in {data_dir}: run `distill generate` first")
    record_config(config.run_dir, "offpolicy", config, force=force, write=False)
    dryrun.finish([
        f"{'resume from ' + str(resume) if resume else 'load ' + config.student}"
        + (f" with rank-{config.lora_rank} LoRA adapters" if config.lora_rank else ""),
        f"{config.steps} steps of {config.batch_size} sequences on {n} kept teacher responses "
        f"from {data_dir}",
        f"checkpoint every {config.save_every} steps to {config.run_dir / config.output}",
    ])  # fmt: skip


@app.command("offpolicy")
@user_errors
def offpolicy_cmd(
    run_dir: RunDir,
    student: StudentOpt = EMBEDDED,
    data_dir: Annotated[
        Path | None, typer.Option(help="teacher data (default: RUN_DIR/teacher_data)")
    ] = None,
    steps: int = offpolicy.Config.steps,
    batch_size: Annotated[
        int, typer.Option(help="sequences per optimizer step, all processes")
    ] = offpolicy.Config.batch_size,
    micro_batch_size: Annotated[
        int, typer.Option(help="sequences per forward/backward on one process")
    ] = offpolicy.Config.micro_batch_size,
    lr: float = offpolicy.Config.lr,
    warmup_steps: WarmupStepsOpt = offpolicy.Config.warmup_steps,
    min_lr_ratio: MinLrRatioOpt = offpolicy.Config.min_lr_ratio,
    weight_decay: float = offpolicy.Config.weight_decay,
    grad_clip: float = offpolicy.Config.grad_clip,
    kd_weight: Annotated[
        float, typer.Option(help="weight of the top-k KD term (needs --store-topk data)")
    ] = offpolicy.Config.kd_weight,
    kd_divergence: offpolicy.Divergence = offpolicy.Config.kd_divergence,
    think_block: Annotated[
        offpolicy.ThinkBlock,
        typer.Option(help="no_think rows: empty think block as 'prompt' or 'target'"),
    ] = offpolicy.Config.think_block,
    dtype: DtypeOpt = offpolicy.Config.dtype,
    log_every: int = offpolicy.Config.log_every,
    save_every: int = offpolicy.Config.save_every,
    report_to: Annotated[
        offpolicy.Tracker, typer.Option(help="accelerate trackers: none, all, tensorboard, wandb")
    ] = offpolicy.Config.report_to,
    seed: int = offpolicy.Config.seed,
    lora_rank: LoraRankOpt = offpolicy.Config.lora_rank,
    lora_alpha: LoraAlphaOpt = offpolicy.Config.lora_alpha,
    fused_loss: FusedLossOpt = offpolicy.Config.fused_loss,
    force: bool = False,
    gradient_checkpointing: GradCheckpointOpt = offpolicy.Config.gradient_checkpointing,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    """Fine-tune the student on the kept teacher responses (resumes from its checkpoint)."""
    # Under `accelerate launch` only rank 0 writes and prints. cpu= must match the trainer's
    # Accelerator: the state is shared, and only cpu=True turns a CPU launch into gloo DDP.
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    run_dir = dryrun.run_dir_for(run_dir)
    _, student_path = resolve_models(EMBEDDED if student == EMBEDDED else student, student, dry_run)
    config = offpolicy.Config(
        run_dir=run_dir,
        student=student_path,
        data_dir=data_dir,
        steps=steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        kd_weight=kd_weight,
        kd_divergence=kd_divergence,
        think_block=think_block,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        log_every=log_every,
        save_every=save_every,
        report_to=report_to,
        seed=seed,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        fused_loss=fused_loss,
    )
    adapters.settings(lora_rank, lora_alpha, seed)  # bad values or no peft: before any record
    if dry_run:
        console.print(config_table("offpolicy", config))
        return dry_offpolicy(config, force)
    if main:
        prepare(run_dir)
        console.print(config_table("offpolicy", config))
        record_config(run_dir, "offpolicy", config, force=force)
    ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
    if not main:
        offpolicy.train(config, ledger)
        return
    with phase_progress() as bars:
        summary = offpolicy.train(config, ledger, bars.log)
    ledger.save(run_dir / "ledger.json")
    console.print(
        f"final loss {summary.final_loss:.4f} on {summary.examples} examples; "
        f"checkpoint {summary.checkpoint}"
    )
