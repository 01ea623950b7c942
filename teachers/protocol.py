"""The one seam between distill and a teacher: token ids in, token ids and log-probabilities out.

Every backend (transformers in-process, vLLM engine, vLLM server) implements `Teacher`. Chat
rendering, modes and the thinking budget live above it (`teachers.chat`), so a backend never sees
text. Arrays cross this boundary as numpy (int32 ids, float32 log-probabilities): they are what a
server returns and what a dataset stores. `TopK` holds them packed in 6 bytes per entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from students.sample import Generation, SamplingParams

# TopK storage: an id's low 16 bits as uint16, its high bits in the lowest mantissa bits of its
# fp32 log-probability ("tag bits"). Qwen3's 151,936 ids need 18 bits, so 2 tag bits: 6 bytes per
# entry instead of 8, and a relative error below 2^-21 on the log-probability, far under the 1e-4
# fp32 parity the tests hold vLLM to. Past MAX_TAG_BITS the error would reach 2^-16 relative (3e-4
# absolute at a log-probability of -20), so wider vocabularies keep int32 ids instead.
LOW_ID_BITS = 16
MAX_TAG_BITS = 7


@dataclass(frozen=True, init=False, eq=False)
class TopK:
    """The teacher's scores of one completion of length L, K entries per position in rank order.

    Alignment, written once for the whole project: row t scores completion token t, i.e. it is
    the teacher's next-token distribution after reading prompt + completion[:t]. In terms of the
    full sequence x with P prompt tokens, row t comes from the logits at position P + t - 1 and
    describes x[P + t]. (vLLM's prompt_logprobs entry P + t is exactly this row.)

    `logprobs` are raw temperature-1 log-softmax values over the teacher's full logits width, as
    vLLM returns them: they need not sum to 1 over the K ids, the rest is the tail mass.

    Built from plain arrays, `TopK(ids=, logprobs=, actual_logprobs=)`, and held packed (see
    `pack_ids`): 6K + 4 bytes per position instead of 8K + 4. `ids` and `logprobs` decode the
    packed arrays on each access (vectorised, fresh arrays: writing to them changes nothing here);
    ids come back exactly, log-probabilities within 2^-(23 - tag_bits) relative (0 when no id
    needs more than 16 bits). Negative ids (padding), ids of 2^23 and above, and non-finite
    log-probabilities next to a tagged id are held unpacked, exactly (int32 ids, 8K + 4 bytes).
    """

    # (L, K) uint16, id & 0xFFFF; int32 whole ids where the ids cannot be packed (see above)
    low_ids: np.ndarray
    tagged_logprobs: np.ndarray  # (L, K) float32: lowest `tag_bits` mantissa bits hold id >> 16
    tag_bits: int  # 0..MAX_TAG_BITS
    actual_logprobs: np.ndarray  # (L,) float32, log p(completion[t] | prefix)

    def __init__(
        self, *, ids: np.ndarray, logprobs: np.ndarray, actual_logprobs: np.ndarray
    ) -> None:
        L, K = ids.shape
        assert logprobs.shape == (L, K), (logprobs.shape, (L, K))
        assert actual_logprobs.shape == (L,), (actual_logprobs.shape, L)
        low_ids, tagged, tag_bits = pack_ids(ids, logprobs)
        object.__setattr__(self, "low_ids", low_ids)
        object.__setattr__(self, "tagged_logprobs", tagged)
        object.__setattr__(self, "tag_bits", tag_bits)
        actual = np.ascontiguousarray(actual_logprobs, dtype=np.float32)
        object.__setattr__(self, "actual_logprobs", actual)

    @property
    def k(self) -> int:
        """K, read from the stored shape: no decoding."""
        return int(self.low_ids.shape[1])

    @property
    def ids(self) -> np.ndarray:
        """(L, K) int32, most probable first."""
        return unpack_ids(self.low_ids, self.tagged_logprobs, self.tag_bits)

    @property
    def logprobs(self) -> np.ndarray:
        """(L, K) float32, non-increasing along K (the tag bits cleared)."""
        return untag_logprobs(self.tagged_logprobs, self.tag_bits)

    def all_finite(self) -> bool:
        # Tagging keeps the exponent, so a tagged value is finite exactly when its original was.
        return bool(
            np.isfinite(self.tagged_logprobs).all() and np.isfinite(self.actual_logprobs).all()
        )

    @property
    def nbytes(self) -> int:
        """Bytes these arrays keep alive: a view counts the whole buffer it holds on to."""
        owners: dict[int, int] = {}
        for a in (self.low_ids, self.tagged_logprobs, self.actual_logprobs):
            while isinstance(a.base, np.ndarray):
                a = a.base
            owners[id(a)] = a.nbytes
        return sum(owners.values())


def pack_ids(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(low ids, tagged log-probabilities, tag bits) holding (L, K) ids and fp32 log-probs.

    tag_bits = bits the largest id needs beyond 16. The tag replaces (truncates) the lowest
    mantissa bits, so |error| < 2^tag_bits ulp, i.e. < 2^-(23 - tag_bits) relative (for the
    subnormals below 1.2e-38, < 2^(tag_bits - 149) absolute), and the rank order (non-increasing)
    survives. Cases tagging cannot hold exactly are kept unpacked.
    """
    lp = np.ascontiguousarray(logprobs, dtype=np.float32)  # (L, K)
    top = int(ids.max(initial=0))
    tag_bits = max(0, top.bit_length() - LOW_ID_BITS)
    if tag_bits == 0 and int(ids.min(initial=0)) >= 0:
        return ids.astype(np.uint16), lp, 0  # every id fits 16 bits: nothing to tag, exact
    if (
        tag_bits > MAX_TAG_BITS
        or int(ids.min(initial=0)) < 0
        # -inf with a tag in its mantissa would read as NaN: keep such rows exact.
        or not np.isfinite(lp).all()
    ):
        return np.ascontiguousarray(ids, dtype=np.int32), lp, 0
    mask = np.uint32((1 << tag_bits) - 1)
    high = (ids >> LOW_ID_BITS).astype(np.uint32)  # (L, K), < 2^tag_bits
    tagged = ((lp.view(np.uint32) & ~mask) | high).view(np.float32)  # (L, K)
    return (ids & 0xFFFF).astype(np.uint16), tagged, tag_bits


def unpack_ids(low_ids: np.ndarray, tagged: np.ndarray, tag_bits: int) -> np.ndarray:
    ids = low_ids.astype(np.int32)  # (L, K), a fresh array
    if tag_bits:
        high = (tagged.view(np.uint32) & np.uint32((1 << tag_bits) - 1)).astype(np.int32)
        ids |= high << LOW_ID_BITS
    return ids


def untag_logprobs(tagged: np.ndarray, tag_bits: int) -> np.ndarray:
    if not tag_bits:
        return tagged.copy()
    keep = np.uint32(0xFFFFFFFF ^ ((1 << tag_bits) - 1))
    return (tagged.view(np.uint32) & keep).view(np.float32)  # (L, K), a fresh array


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
        if not s.all_finite():
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
