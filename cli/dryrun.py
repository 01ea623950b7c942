"""`--dry-run`: everything a command would check, nothing it would write or run.

A dry run resolves and validates every option (the configs validate themselves), the run
directory (writable, and a resume with a changed config refused), the prompt files, the models'
configs and tokenizers and their chat templates, and the teacher (a server is asked for its
models, as a real run asks first); then it prints the resolved config and what would run, and
exits 0. It writes nothing: not into the run directory (not even to create it), not into the
cache (an embedded pair or tiny preset not built yet is reported, not built), and it loads no
weights. A GPU-day's configuration is checked in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cli.render import console
from distill import embedded
from distill.errors import DistillError
from students.load import first_sentences
from students.tiny import TINY_SHAPES
from teachers.protocol import TeacherError, refuse_remote_code

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="check every option, file, model, tokenizer and the teacher; print the resolved "
        "config and what would run; write nothing",
    ),
]


def run_dir_for(run_dir: Path) -> Path:
    """`run_dir`, checked writable without creating or writing anything: a real run creates it
    (`prepare`) only once every option is validated, a dry run never."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DistillError(f"run directory {run_dir} is a file: choose another --run-dir")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DistillError(
            f"cannot write to run directory {run_dir} ({existing} is not writable): choose "
            "another --run-dir or fix its permissions"
        )
    return run_dir


def pending(path: str) -> bool:
    """A model a dry run does not build: the embedded pair not built yet, or a tiny preset."""
    assets, built = embedded.cached()
    return path in TINY_SHAPES or (not built and path in (str(assets.teacher), str(assets.student)))


def tokenizer(
    path: str, what: str, trust_remote_code: bool = False, local_only: bool = True
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or hub id, or a one-line error naming it. A dry run
    (`local_only`) reads the disk only; a real run may download a hub id's files."""
    folder = Path(path)
    if folder.is_dir():
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            held = sorted(p.name for p in folder.iterdir())
            raise DistillError(
                f"the {what} folder {path} holds no tokenizer (none of "
                f"{', '.join(TOKENIZER_FILES[:2])}, ...; it holds {held[:6] or 'nothing'}): "
                "pass a folder written by save_pretrained with its tokenizer"
            )
        refuse_remote_code(path, trust=trust_remote_code, fix="pass --trust-remote-code")
    try:
        return AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except DistillError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... by case
        raise DistillError(
            f"cannot load the {what} tokenizer from {path!r} ({type(e).__name__}: "
            f"{first_sentences(str(e))}): pass a model folder with its tokenizer, or "
            "a hub id whose files are reachable or cached"
        ) from None


# A tokenizer folder holds at least one of these (fast, slow BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model",
)  # fmt: skip


def model_config(path: str, what: str) -> dict[str, object]:
    """config.json of a local model folder (a hub id is checked by its tokenizer only)."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DistillError(
            f"the {what} folder {path} has no readable config.json ({e}): pass a folder "
            "written by save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise DistillError(f"{file} is not a JSON object: restore the {what}'s config.json")
    return config


def teacher_limit(backend: str, path: str, urls: Sequence[str], max_top_k: int | None) -> int:
    """The widest top-k the teacher would serve, found without loading its weights.

    hf: the head width in config.json; vllm: `max_top_k` (vllm must be importable); server:
    every URL well formed and answering (`ServerTeacher.connect` asks for its models)."""
    if backend == "server":
        from teachers.server import ServerTeacher

        return ServerTeacher.connect(urls, path, max_top_k=max_top_k or 20).max_top_k
    if not Path(path).is_dir():
        raise DistillError(
            f"teacher {path!r} is not a model folder: pass a folder written by save_pretrained "
            "(config.json + safetensors + tokenizer), or 'embedded'"
        )
    width = model_config(path, "teacher").get("vocab_size")
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise TeacherError("--teacher-backend vllm needs vLLM: pip install 'distill[vllm]'")
        return max_top_k or 20
    if not isinstance(width, int) or width < 1:
        raise DistillError(f"{path}/config.json has no vocab_size: restore the teacher's config")
    return width


def check_urls(urls: list[str] | None) -> list[str] | None:
    """A --teacher-url callback: every URL http(s)://host[:port], before anything runs."""
    for url in urls or []:
        try:
            parts = urlparse(url)
            port = parts.port  # raises ValueError on a port out of range or not a number
        except ValueError as e:
            raise typer.BadParameter(f"{url!r} is not a URL ({e}): pass http://HOST:PORT") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise typer.BadParameter(f"{url!r} is not an http(s) URL: pass http://HOST:PORT")
        if port == 0 or any(c.isspace() for c in url):
            raise typer.BadParameter(f"{url!r} is not a usable URL: pass http://HOST:PORT")
    return urls


def finish(would: Sequence[str]) -> None:
    """The last lines of a dry run: what a real run would do. Exit code 0."""
    console.print("[bold]dry run[/]: every option and input checked; nothing written. Would run:")
    for i, step in enumerate(would, 1):
        console.print(f"  {i}. {step}", highlight=False, soft_wrap=True)
