"""Security: no model's own code runs unless asked, API keys stay in the environment, only
weights-only loads, and cleanup never follows a symlink out of the run directory.
"""

from __future__ import annotations

import ast
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from distill import checkpoint
from distill.errors import DistillError
from teachers.hf import HFTeacher
from teachers.launch import API_KEY_ENV
from teachers.protocol import TeacherError
from teachers.server import ServerConfig, ServerTeacher
from tests.conftest import TinyPair

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "distill", "teachers", "students", "losses", "benchmarks", "scripts")
SECRET = "sk-test-9f8e7d6c5b4a"
runner = CliRunner()


def calls(name: str) -> Iterator[tuple[Path, ast.Call]]:
    """Every call to `name` (a bare or dotted name ending in it) in the project's own code."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                    yield path.relative_to(ROOT), node


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


# --- loads -----------------------------------------------------------------------------------


def test_every_torch_load_is_weights_only() -> None:
    found = list(calls("torch.load"))
    assert found, "the scan finds torch.load calls (checkpoint.load_state has one)"
    for path, call in found:
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{path}:{call.lineno}: torch.load without weights_only=True can run pickled code"
        )


def test_trust_remote_code_is_never_switched_on_in_code() -> None:
    scanned = 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                    scanned += 1
                    on = isinstance(node.value, ast.Constant) and node.value.value is True
                    assert not on, f"{path}:{node.lineno}: trust_remote_code=True in code"
    assert scanned > 0, "the scan sees the explicit trust_remote_code arguments"


@pytest.fixture
def evil_teacher(tiny_pair: TinyPair, tmp_path: Path) -> tuple[Path, Path]:
    """A teacher folder whose config asks for its own code, which would leave a marker."""
    folder = tmp_path / "evil"
    shutil.copytree(tiny_pair.teacher_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_teacher_with_its_own_code_is_refused_without_the_flag(
    evil_teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, marker = evil_teacher
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+3?"}\n')
    result = runner.invoke(app, ["generate", "--run-dir", str(tmp_path / "run"), "--teacher",
                                 str(folder), "--prompts", str(prompts)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "ships its own Python code" in result.output and "--trust-remote-code" in result.output
    with pytest.raises(TeacherError, match="auto_map in config.json"):
        HFTeacher.from_pretrained(folder)
    assert not marker.exists()


def test_the_flag_reaches_the_loaders(
    evil_teacher: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = evil_teacher
    seen: list[object] = []

    def tokenizer_loader(*args: object, **kwargs: object) -> None:
        seen.append(kwargs.get("trust_remote_code"))
        raise DistillError("stopped before loading")

    import cli.dryrun

    monkeypatch.setattr(cli.dryrun.AutoTokenizer, "from_pretrained", tokenizer_loader)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+3?"}\n')
    result = runner.invoke(app, ["generate", "--run-dir", str(tmp_path / "run"), "--teacher",
                                 str(folder), "--prompts", str(prompts),
                                 "--trust-remote-code"])  # fmt: skip
    assert result.exit_code == 2 and "stopped before loading" in result.output, result.output
    assert seen == [True] and not marker.exists()


def test_a_student_with_its_own_code_is_refused(
    evil_teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, marker = evil_teacher
    result = runner.invoke(app, ["offpolicy", "--run-dir", str(tmp_path / "run"), "--student",
                                 str(folder)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "ships its own Python code" in result.output and not marker.exists()


# --- API keys --------------------------------------------------------------------------------


def test_no_command_takes_a_secret_on_the_command_line() -> None:
    """A key on the command line lands in shell history and `ps`: only the environment holds it."""
    command = typer.main.get_command(app)

    def options(cmd: object) -> Iterator[str]:
        for sub in getattr(cmd, "commands", {}).values():  # a group (typer vendors click)
            yield from options(sub)
        for param in getattr(cmd, "params", []):
            yield from getattr(param, "opts", [])

    names = list(options(command))
    assert "--run-dir" in names
    leaks = [n for n in names if any(w in n.lower() for w in ("key", "secret", "password"))]
    assert not leaks, leaks


class _Recorder(BaseHTTPRequestHandler):
    auth: list[str | None] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def do_POST(self) -> None:
        self.auth.append(self.headers.get("Authorization"))
        code = 401 if len(self.auth) == 1 else 500
        body = json.dumps({"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


def test_api_key_is_read_from_the_environment_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    _Recorder.auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teacher = ServerTeacher([f"http://127.0.0.1:{server.server_address[1]}"], "m",
                                vocab_size=10, logits_width=10, eos_id=0, max_top_k=4,
                                config=ServerConfig(retries=1, backoff_s=0.0))  # fmt: skip
        with pytest.raises(TeacherError) as refused:  # 401: the key is wrong
            teacher.score([[1, 2, 3]], [1], 2)
        with pytest.raises(TeacherError) as failed:  # 5xx twice: retries exhausted
            teacher.score([[1, 2, 3]], [1], 2)
    finally:
        server.shutdown()
    assert _Recorder.auth[0] == f"Bearer {SECRET}"  # sent, from the environment
    assert API_KEY_ENV in str(refused.value)
    for message in (str(refused.value), str(failed.value)):
        assert SECRET not in message


def test_api_key_stays_out_of_printed_commands_and_run_files(
    tiny_pair: TinyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    result = runner.invoke(app, ["teacher", "serve", "--teacher", str(tiny_pair.teacher_dir),
                                 "--print-only"])  # fmt: skip
    assert result.exit_code == 0 and f"${API_KEY_ENV}" in result.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+3?"}\n')
    run = tmp_path / "run"
    result = runner.invoke(app, ["generate", "--run-dir", str(run), "--teacher",
                                 str(tiny_pair.teacher_dir), "--prompts", str(prompts),
                                 "--max-tokens", "4"])  # fmt: skip
    assert result.exit_code in (0, 2) and (run / "config.json").exists(), result.output
    assert SECRET not in result.output
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# --- cleanup and symlinks --------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the run directory that cleanup must never touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def save(tiny_pair: TinyPair, directory: Path, step: int) -> None:
    checkpoint.save(directory, tiny_pair.student, tiny_pair.tokenizer, {"step": step})


def test_checkpoint_swap_never_follows_symlinks_out(
    tiny_pair: TinyPair, tmp_path: Path, outside: Path
) -> None:
    out = tmp_path / "run" / "offpolicy" / "checkpoint"
    out.parent.mkdir(parents=True)
    # Planted by someone (or left by a tool): links where cleanup deletes.
    (out.parent / "checkpoint.old").symlink_to(outside, target_is_directory=True)
    (out.parent / ".checkpoint.tmp-stale").symlink_to(outside, target_is_directory=True)
    save(tiny_pair, out, 0)
    (out / "link-out").symlink_to(outside, target_is_directory=True)  # inside a checkpoint
    save(tiny_pair, out, 1)  # moves the first checkpoint to .old, then deletes it
    assert (outside / "precious.txt").read_text() == "keep me"
    assert checkpoint.load_state(out)["step"] == 1
    assert not any(p.is_symlink() for p in out.parent.iterdir())


def test_a_checkpoint_that_is_a_symlink_is_replaced_not_emptied(
    tiny_pair: TinyPair, tmp_path: Path, outside: Path
) -> None:
    out = tmp_path / "run" / "onpolicy" / "checkpoint"
    out.parent.mkdir(parents=True)
    out.symlink_to(outside, target_is_directory=True)
    save(tiny_pair, out, 3)
    assert (outside / "precious.txt").read_text() == "keep me"
    assert not out.is_symlink() and checkpoint.load_state(out)["step"] == 3


def test_stale_temporary_shards_are_unlinked_not_followed(
    tiny_pair: TinyPair, tmp_path: Path, outside: Path
) -> None:
    run = tmp_path / "run"
    data = run / "teacher_data"
    data.mkdir(parents=True)
    (data / ".shard-00000.parquet.x.tmp").symlink_to(outside / "precious.txt")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+3?"}\n')
    result = runner.invoke(app, ["generate", "--run-dir", str(run), "--teacher",
                                 str(tiny_pair.teacher_dir), "--prompts", str(prompts),
                                 "--max-tokens", "4"])  # fmt: skip
    assert result.exit_code in (0, 2), result.output
    assert (outside / "precious.txt").read_text() == "keep me"
    assert not list(data.glob(".shard-*.tmp"))
