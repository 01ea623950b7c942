"""`distill teacher serve|check`, and `make_teacher`, the one place a backend is chosen.

distill teacher serve --teacher 32B --port 8000            # starts vLLM, prints the URL
distill teacher serve --teacher ./my-teacher --print-only  # shows the command only
distill teacher check --teacher ./teacher --student ./student --teacher-backend vllm
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import typer

from cli.render import console, user_errors
from students.dtype import HELP as DTYPE_HELP
from students.dtype import check_name
from teachers.protocol import Teacher, TeacherError

TeacherBackend = Literal["hf", "vllm", "server"]
BACKENDS: tuple[TeacherBackend, ...] = ("hf", "vllm", "server")

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
) -> Teacher:
    """A teacher behind the protocol; `model` is a local folder (hf, vllm) or the served name.

    `max_top_k` is the server's `--max-logprobs` (default 20) for `server`, the engine's
    `max_logprobs` for `vllm`, and ignored for `hf` (it serves the full width). `dtype`
    (`--teacher-dtype`): the weights' dtype in `hf` and `vllm`; a server runs in the dtype it
    was started with (`distill teacher serve --dtype`). `n_params` (`--teacher-params`): the
    teacher's N for the ledger's FLOPs (2·N per token); 0 reads it from the model's config.
    """
    check_name(dtype, "--teacher-dtype")
    if n_params < 0:
        raise TeacherError(f"--teacher-params {n_params}: use 0 (from the config) or a count")
    teacher = _make(backend, model, urls, max_top_k, trust_remote_code, dtype)
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
) -> Teacher:
    if backend == "hf":
        from teachers.hf import HFTeacher

        return HFTeacher.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if backend == "vllm":
        from teachers.vllm import VLLMTeacher  # lazy: vllm is an optional extra

        return VLLMTeacher.from_pretrained(
            model, max_top_k=max_top_k or 20, dtype=dtype, trust_remote_code=trust_remote_code
        )
    if backend == "server":
        from teachers.server import ServerTeacher

        if not urls:
            raise TeacherError(
                "--teacher-backend server needs --teacher-url (e.g. http://127.0.0.1:8000); start "
                f"a server with `distill teacher serve --teacher {model}`"
            )
        return ServerTeacher.connect(urls, model, max_top_k=max_top_k or 20)
    raise TeacherError(f"unknown teacher backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def teacher_metrics(teacher: Teacher) -> dict[str, float]:
    """Retried request failures of a server teacher by kind, for metrics.jsonl ({} otherwise)."""
    faults = getattr(teacher, "faults", None)
    if not isinstance(faults, dict):
        return {}
    return {"teacher_retries": float(sum(faults.values()))} | {
        f"teacher_retries_{kind}": float(n) for kind, n in sorted(faults.items())
    }


def parse_backend(name: str) -> TeacherBackend:
    """A --teacher-backend value, checked (typer has no Literal choices on every version)."""
    for b in BACKENDS:
        if name == b:
            return b
    raise TeacherError(f"--teacher-backend must be one of {', '.join(BACKENDS)}, not {name!r}")


@teacher_app.command()
@user_errors
def serve(
    teacher: Annotated[str, typer.Option(help="32B, 235B-A22B, or a local model folder")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port; 0 picks a free one")] = 8000,
    max_logprobs: Annotated[int | None, typer.Option(help="largest top-k served")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length")] = None,
    print_only: Annotated[bool, typer.Option(help="print the command, start nothing")] = False,
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
    port = port or launch.free_port(host)
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
    if print_only:
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
    teacher_url: Annotated[list[str] | None, typer.Option(help="server URL(s)")] = None,
    max_top_k: Annotated[int, typer.Option(help="the server's --max-logprobs")] = 20,
    top_k: Annotated[int, typer.Option(help="teacher top-k compared")] = 8,
    n: Annotated[int, typer.Option(help="sequences compared")] = 4,
    atol: Annotated[float, typer.Option(help="largest logprob difference accepted")] = 1e-4,
    teacher_dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
) -> None:
    """Template parity, logprob parity (backend vs transformers) and KL(teacher||teacher) = 0."""
    from rich.table import Table
    from transformers import AutoTokenizer

    from distill.parity import check_conversations, logprob_parity
    from teachers.hf import HFTeacher

    backend_name = parse_backend(teacher_backend)
    tok_t, tok_s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    convs = check_conversations(tok_t, tok_s, n)
    backend = make_teacher(
        backend_name, teacher, teacher_url or (), max_top_k=max_top_k, dtype=teacher_dtype
    )
    reference = HFTeacher.from_pretrained(teacher, dtype="float32")  # the exact reference
    report = logprob_parity(backend, reference, reference.model, tok_t, convs, top_k)
    diff_lp, diff_top, same_ids, kl = (
        report.max_actual_diff,
        report.max_topk_diff,
        report.same_ids,
        report.self_kl,
    )

    table = Table(title=f"teacher check: {backend.name} vs {reference.name}")
    for col in ("check", "value", "ok"):
        table.add_column(col)
    ok_lp = max(diff_lp, diff_top) <= atol
    table.add_row("template parity", f"{len(convs)} conversations x 2 modes", "yes")
    table.add_row(
        "max |logprob diff| (actual, top-k)",
        f"{diff_lp:.2e}, {diff_top:.2e}",
        "yes" if ok_lp else f"no (> {atol:g})",
    )
    table.add_row("top-k ids equal", f"{same_ids:.1%}", "yes" if same_ids == 1.0 else "check")
    table.add_row("KL(teacher || teacher as student)", f"{kl:.2e}", "yes" if kl < 1e-4 else "no")
    console.print(table)
    if not ok_lp or kl >= 1e-4:
        raise typer.Exit(1)
