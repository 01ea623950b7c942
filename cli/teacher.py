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
) -> Teacher:
    """A teacher behind the protocol; `model` is a local folder (hf, vllm) or the served name.

    `max_top_k` is the server's `--max-logprobs` (default 20) for `server`, the engine's
    `max_logprobs` for `vllm`, and ignored for `hf` (it serves the full width).
    """
    if backend == "hf":
        from teachers.hf import HFTeacher

        return HFTeacher.from_pretrained(model)
    if backend == "vllm":
        from teachers.vllm import VLLMTeacher  # lazy: vllm is an optional extra

        return VLLMTeacher.from_pretrained(model, max_top_k=max_top_k or 20)
    if backend == "server":
        from teachers.server import ServerTeacher

        if not urls:
            raise TeacherError(
                "--teacher-backend server needs --teacher-url (e.g. http://127.0.0.1:8000); start "
                f"a server with `distill teacher serve --teacher {model}`"
            )
        return ServerTeacher.connect(urls, model, max_top_k=max_top_k or 20)
    raise TeacherError(f"unknown teacher backend {backend!r}: choose one of {', '.join(BACKENDS)}")


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
) -> None:
    """Start a vLLM server for a teacher, wait until healthy, print its URL, keep it running."""
    from teachers import launch

    preset = launch.resolve_preset(teacher)
    cpu = launch.on_cpu()
    port = port or launch.free_port(host)
    cmd = launch.serve_command(preset, host=host, port=port, cpu=cpu, max_logprobs=max_logprobs,
                               max_model_len=max_model_len)
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
