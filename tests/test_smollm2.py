"""Real weights: SmolLM2-135M-Instruct (Llama architecture, ChatML template without a thinking
switch, a default system prompt it injects) and a depth-pruned copy of it, through the CLI.

The default run covers one real-weights path end to end (teacher check, plain-mode teacher data,
off-policy steps into the pruned student, eval); the vLLM server and on-policy runs are slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import SMOLLM2_LAYERS

runner = CliRunner()

PROMPTS = [
    "Say hello in five words.",
    "Name a color of the sky.",
    "What is 2 + 3?",
    "Give one word that rhymes with cat.",
]


def ok(args: list[str]) -> str:
    from cli import app

    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smol") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def answers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smol") / "answers.jsonl"
    rows = [("What is 2 + 3?", "5"), ("What is 10 - 4?", "6")]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def test_pruned_copy_loads_with_from_pretrained(smollm2_pair: tuple[Path, Path]) -> None:
    from transformers import AutoConfig

    teacher, student = smollm2_pair
    assert AutoConfig.from_pretrained(teacher).num_hidden_layers == 30
    assert AutoConfig.from_pretrained(student).num_hidden_layers == SMOLLM2_LAYERS


def test_teacher_check_on_the_real_pair(smollm2_pair: tuple[Path, Path]) -> None:
    teacher, student = smollm2_pair
    out = ok(["teacher", "check", "--teacher", str(teacher), "--student", str(student),
              "--teacher-backend", "hf", "--n", "2", "--max-tokens", "8"])  # fmt: skip
    assert "modes plain" in out and "tolerance 0.002, float32" in out
    assert "KL(teacher || student) per token" in out and "top-1 agreement" in out


def test_plain_pipeline_into_the_pruned_student(
    smollm2_pair: tuple[Path, Path], prompt_file: Path, answers_file: Path, tmp_path: Path
) -> None:
    teacher, student = (str(p) for p in smollm2_pair)
    run = tmp_path / "run"
    # 48 new tokens: at 24, three of the four answers were cut off (filtered) in one random stream
    out = ok(["generate", "--run-dir", str(run), "--teacher", teacher, "--prompts",
              str(prompt_file), "--max-tokens", "48", "--store-topk", "4"])  # fmt: skip
    assert "chat template format: none; modes: plain" in out
    rows = pq.read_table(run / "teacher_data").to_pylist()
    assert {r["mode"] for r in rows} == {"plain"} and all(r["thinking_tokens"] == 0 for r in rows)
    out = ok(["offpolicy", "--run-dir", str(run), "--student", student, "--steps", "2",
              "--batch-size", "2", "--micro-batch-size", "2", "--kd-weight", "1"])  # fmt: skip
    assert "final loss" in out
    ckpt = run / "offpolicy" / "checkpoint"
    ok(["eval", "--run-dir", str(run), "--model", str(ckpt), "--prompts", str(answers_file),
        "--n-prompts", "2", "--n", "1", "--k", "1", "--max-tokens", "12",
        "--name", "real"])  # fmt: skip
    audit = pq.read_table(run / "eval" / "real.responses.parquet").to_pylist()
    assert len(audit) == 2 and {r["mode"] for r in audit} == {"plain"}


@pytest.mark.slow
def test_onpolicy_into_the_pruned_student(
    smollm2_pair: tuple[Path, Path], prompt_file: Path, tmp_path: Path
) -> None:
    teacher, student = (str(p) for p in smollm2_pair)
    out = ok(["onpolicy", "--run-dir", str(tmp_path), "--teacher", teacher, "--student", student,
              "--prompts", str(prompt_file), "--n-prompts", "3", "--steps", "2",
              "--prompts-per-step", "2", "--max-tokens", "16", "--top-k", "8"])  # fmt: skip
    assert "final loss" in out
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in m for m in metrics)


@pytest.mark.slow
@pytest.mark.vllm
def test_generate_plain_from_a_real_vllm_server(
    smollm2: Path, prompt_file: Path, tmp_path: Path
) -> None:
    from teachers import launch

    port = launch.free_port()
    cmd = launch.serve_command(
        launch.resolve_preset(str(smollm2)), port=port, cpu=True, max_logprobs=8,
        max_model_len=1024,
    )  # fmt: skip
    proc = launch.start_server(cmd, launch.server_env(cpu=True), tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        launch.wait_healthy(url, proc, timeout_s=600)
        out = ok(["generate", "--run-dir", str(tmp_path / "run"), "--teacher", str(smollm2),
                  "--prompts", str(prompt_file), "--max-tokens", "24", "--store-topk", "4",
                  "--teacher-backend", "server", "--teacher-url", url])  # fmt: skip
        assert "modes: plain" in out
        rows = pq.read_table(tmp_path / "run" / "teacher_data").to_pylist()
        assert len(rows) == len(PROMPTS) and {r["mode"] for r in rows} == {"plain"}
        assert all(len(r["topk_ids"]) == len(r["response_ids"]) for r in rows)
    finally:
        launch.stop_server(proc)
