"""The one seam between distill and a teacher: token ids in, token ids and log-probabilities out.

Every backend (transformers in-process, vLLM engine, vLLM server) implements `Teacher`. Chat
rendering, modes and the thinking budget live above it (`teachers.chat`), so a backend never sees
text. Arrays cross this boundary as numpy (int32 ids, float32 log-probabilities): they are what a
server returns, what a dataset stores, and they cost 4 bytes per entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One decoding setting. `top_k=0` and `top_p=1.0` disable those filters; T=0 is greedy."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    presence_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.temperature >= 0.0, self.temperature
        assert 0.0 < self.top_p <= 1.0, self.top_p
        assert self.top_k >= 0 and self.max_tokens >= 1, (self.top_k, self.max_tokens)


# The paper's presets (Qwen3 report §4; FACTS.md). Presence penalty 1.5 is the report's
# suggestion for non-thinking mode.
THINKING_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
NON_THINKING_SAMPLING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One completion. `forced` marks tokens inserted by the caller (the budget sentence)."""

    token_ids: np.ndarray  # (L,) int32, completion only (no prompt)
    finish_reason: FinishReason  # "stop": eos emitted (and kept as the last id); "length": cut off
    forced: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (L,) bool

    def __post_init__(self) -> None:
        if self.forced.shape[0] != self.token_ids.shape[0]:
            object.__setattr__(self, "forced", np.zeros(self.token_ids.shape[0], dtype=bool))


@dataclass(frozen=True, kw_only=True)
class TopK:
    """The teacher's scores of one completion of length L, K entries per position in rank order.

    Alignment, written once for the whole project: row t scores completion token t, i.e. it is
    the teacher's next-token distribution after reading prompt + completion[:t]. In terms of the
    full sequence x with P prompt tokens, row t comes from the logits at position P + t - 1 and
    describes x[P + t]. (vLLM's prompt_logprobs entry P + t is exactly this row.)

    `logprobs` are raw temperature-1 log-softmax values over the teacher's full logits width, as
    vLLM returns them: they need not sum to 1 over the K ids, the rest is the tail mass.
    """

    ids: np.ndarray  # (L, K) int32, most probable first
    logprobs: np.ndarray  # (L, K) float32, non-increasing along K
    actual_logprobs: np.ndarray  # (L,) float32, log p(completion[t] | prefix)

    def __post_init__(self) -> None:
        L, K = self.ids.shape
        assert self.logprobs.shape == (L, K), (self.logprobs.shape, (L, K))
        assert self.actual_logprobs.shape == (L,), (self.actual_logprobs.shape, L)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.logprobs.nbytes + self.actual_logprobs.nbytes


@runtime_checkable
class Teacher(Protocol):
    """A scoring and generating causal LM: teachers.hf, teachers.vllm, teachers.server."""

    @property
    def name(self) -> str:
        """Identity recorded in datasets and manifests (a path or hub id and a weight hash)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Real vocabulary: the tokenizer's length. Ids at or above it are padded head rows."""
        ...

    @property
    def logits_width(self) -> int:
        """Rows of the output head (Qwen3: 151,936 for 151,669 real ids)."""
        ...

    @property
    def max_top_k(self) -> int:
        """Largest `top_k` that `score` serves (vLLM: the server's --max-logprobs)."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        """Sample one completion per prompt (token ids in, token ids out)."""
        ...

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int
    ) -> list[TopK]:
        """Score each sequence's completion (positions >= its prompt length); see `TopK`."""
        ...


def check_scores(scores: Sequence[TopK], teacher_name: str) -> None:
    """Refuse NaN or inf from a teacher: one poisoned position would silently corrupt a KL."""
    for i, s in enumerate(scores):
        if not (np.isfinite(s.logprobs).all() and np.isfinite(s.actual_logprobs).all()):
            raise TeacherError(
                f"teacher {teacher_name} returned NaN or inf log-probabilities for sequence {i}; "
                "check the teacher's dtype (use bf16/fp32, not fp16) and its weights"
            )


class TeacherError(RuntimeError):
    """A teacher that cannot serve the request as asked; the message names the fix."""


def refuse_remote_code(path: str | Path, *, trust: bool, fix: str) -> None:
    """Raise when a local model folder ships its own Python code and `trust` is off.

    transformers runs such code (`auto_map` in config.json or tokenizer_config.json) when asked
    to, and *asks on a terminal* when `trust_remote_code` is left unset: a careless "y" would
    run it. distill decides here, before any load, and only an explicit flag turns it on.
    """
    folder = Path(path)
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") if file.is_file() else None
        except (ValueError, OSError, AttributeError):
            continue  # unreadable: the loader itself reports it
        if auto_map and not trust:
            raise TeacherError(
                f"{folder} ships its own Python code (auto_map in {name}), which distill does "
                f"not run by default: {fix}"
            )
