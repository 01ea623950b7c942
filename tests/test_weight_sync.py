"""Weight sync's gathering (issue #24 item 2), what CPU can check: HF-named tensors one decoder
layer at a time, in the engine's dtype, the tied head left to vLLM; under FSDP2 (two gloo
processes) each layer gathered from the shards equals the unsharded weights. The engine side is
tests/test_sampler_vllm.py (greedy tokens equal transformers after a sync)."""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn
from transformers import AutoModelForCausalLM

from students.weight_sync import SyncStats, full_weights, layer_groups
from tests.conftest import TinyPair


def test_layer_groups_follow_the_decoder_layers() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b",
             "model.layers.1.a", "model.layers.10.a", "model.norm.weight", "lm_head.w"]  # fmt: skip
    assert layer_groups(names) == [[0], [1, 2], [3], [4], [5, 6]]


def test_full_weights_one_layer_at_a_time(tiny_pair: TinyPair) -> None:
    model = tiny_pair.student
    groups = list(full_weights(model, torch.bfloat16))
    layers = model.config.num_hidden_layers
    assert len(groups) == layers + 2  # embeddings, each layer, final norm (+ an untied head)
    sent = {n: t for g in groups for n, t in g}
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    assert set(sent) == set(state) - ({"lm_head.weight"} if tied else set())
    for name, t in sent.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, state[name].to(torch.bfloat16))
    stats = SyncStats(path="rpc", tensors=len(sent), bytes=2_000_000_000, seconds=2.0)
    assert stats.metrics() == {"sync_gb": 2.0, "sync_s": 2.0, "sync_gb_per_s": 1.0}


def _fsdp_worker(rank: int, port: int, student_dir: str, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    shard = next(p for p in model.parameters())
    gathered = [(n, t.shape, float(t.double().sum())) for g in full_weights(model, torch.float32)
                for n, t in g]  # fmt: skip
    out[rank] = (type(shard).__name__, gathered)
    dist.destroy_process_group()


def test_fsdp2_shards_are_gathered_whole(tiny_pair: TinyPair) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with multiprocessing.Manager() as manager:
        out = manager.dict()
        spawn(_fsdp_worker, args=(port, str(tiny_pair.student_dir), out), nprocs=2, join=True)
        result = dict(out)
    plain = AutoModelForCausalLM.from_pretrained(Path(tiny_pair.student_dir), dtype=torch.float32)
    want = [(n, t.shape, float(t.double().sum())) for g in full_weights(plain, torch.float32)
            for n, t in g]  # fmt: skip
    for rank in (0, 1):
        kind, got = result[rank]
        assert kind == "DTensor"  # really sharded
        assert [(n, s) for n, s, _ in got] == [(n, s) for n, s, _ in want]
        assert [v for *_, v in got] == pytest.approx([v for *_, v in want], rel=1e-6, abs=1e-6)
