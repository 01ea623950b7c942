"""GpuLedger: every second charged once, remote teacher reserved, resume, rank merge, MFU, FLOPs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3ForCausalLM

from distill import accounting
from distill.accounting import (
    GpuLedger,
    PhaseTotals,
    forward_flops,
    gather_ranks,
    matmul_params,
    peak_flops,
    train_flops,
)
from distill.architectures import Architecture
from distill.errors import DistillError
from students.load import check_head
from students.presets import StudentError
from students.tiny import TINY_SHAPES, tiny_qwen3
from tests.conftest import TinyPair


class Clock:
    """A fake perf_counter the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(accounting.time, "perf_counter", c)
    return c


def test_every_second_is_charged_once_in_process(clock: Clock) -> None:
    ledger = GpuLedger("cpu", devices=2)
    clock.now += 3  # loading models: nobody works, both devices wait
    with ledger.phase("teacher.score") as m:  # in-process teacher: the student's devices
        clock.now += 5
        m.add(100)
    with ledger.phase("student.train", devices=2):
        clock.now += 7
    clock.now += 1
    ledger.save(Path("/dev/null"))  # charges the last gap
    hours = ledger.device_hours()
    assert hours["waiting"] * 3600 == pytest.approx(2 * 4)
    assert hours["teacher.score"] * 3600 == pytest.approx(2 * 5)
    assert hours["student.train"] * 3600 == pytest.approx(2 * 7)
    assert ledger.total_device_hours() * 3600 == pytest.approx(16 * 2)
    assert ledger.wall_seconds() == pytest.approx(16)
    assert ledger.phases["teacher.score"].tokens == 100


def test_remote_teacher_is_charged_while_reserved(clock: Clock) -> None:
    ledger = GpuLedger("cuda:NVIDIA H100 80GB HBM3", devices=1, teacher_devices=8)
    with ledger.phase("teacher.score"):  # 8 teacher devices work, the student's one waits
        clock.now += 10
    with ledger.phase("student.train"):  # the student works, the teacher stays reserved
        clock.now += 5
    clock.now += 2  # gap: all 9 devices idle
    ledger.save(Path("/dev/null"))
    seconds = {k: v * 3600 for k, v in ledger.device_hours().items()}
    assert seconds == pytest.approx(
        {"teacher.score": 80, "waiting": 10 + 18, "student.train": 5, "teacher.reserved": 40}
    )
    assert ledger.total_device_hours() * 3600 == pytest.approx(17 * 9)


def test_nested_phase_charges_the_innermost(clock: Clock) -> None:
    ledger = GpuLedger("cpu")
    with ledger.phase("eval"):
        clock.now += 2
        with ledger.phase("teacher.score"):
            clock.now += 3
        clock.now += 1
    assert ledger.phases["eval"].seconds == pytest.approx(3)
    assert ledger.phases["teacher.score"].seconds == pytest.approx(3)


def test_eval_rounds_and_marks_record_device_hours(clock: Clock) -> None:
    ledger = GpuLedger("cpu")
    for _ in range(2):  # two calls in one round: one point
        with ledger.phase("eval"):
            clock.now += 1
    with ledger.phase("student.train"):
        clock.now += 3600
    ledger.mark("after_train")
    with ledger.phase("eval"):
        clock.now += 1
    assert ledger.eval_points == pytest.approx([0.0, (2 + 3600) / 3600])
    assert ledger.marks["after_train"] == pytest.approx((2 + 3600) / 3600)


def test_save_load_resume_does_not_charge_the_downtime(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = GpuLedger("cpu", teacher_devices=2)
    with ledger.phase("student.train") as m:
        clock.now += 10
        m.add(5, 1e9)
    ledger.mark("x")
    ledger.save(path)
    clock.now += 10_000  # killed; the devices were released
    again = GpuLedger.load(path)
    assert again.teacher_devices == 2 and again.marks == ledger.marks
    with again.phase("student.train") as m:
        clock.now += 10
        m.add(5, 1e9)
    again.save(path)
    t = GpuLedger.load(path).phases["student.train"]
    assert (t.seconds, t.tokens, t.calls, t.flops) == (20, 10, 2, 2e9)
    assert GpuLedger.load(path).total_device_hours() * 3600 == pytest.approx(20 * 3)
    assert GpuLedger.load(path, teacher_devices=0).teacher_devices == 0


def test_load_reads_a_ledger_written_before_the_new_fields(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    old = {"device": "cpu", "phases": {"eval": {"seconds": 2.0, "device_seconds": 2.0,
           "tokens": 3, "flops": 0.0, "calls": 1}}}  # fmt: skip
    path.write_text(json.dumps(old))
    assert GpuLedger.load(path).device_hours() == {"eval": pytest.approx(2 / 3600)}
    path.write_text("[1, 2]")
    with pytest.raises(DistillError, match="not a distill ledger"):
        GpuLedger.load(path)


def test_gather_ranks_sums_work_and_takes_time_once() -> None:
    base = PhaseTotals(seconds=100, device_seconds=200, tokens=1000, flops=10.0, calls=4)
    ranks = []
    for extra_seconds, extra_tokens in ((10.0, 7), (12.0, 9)):
        ledger = GpuLedger("cpu", devices=2)
        ledger.loaded = {"student.train": PhaseTotals(**vars(base))}
        ledger.phases = {
            "student.train": PhaseTotals(
                seconds=100 + extra_seconds,
                device_seconds=200 + 2 * extra_seconds,
                tokens=1000 + extra_tokens,
                flops=10.0 + extra_tokens,
                calls=5,
            )
        }
        ranks.append(ledger)
    t = gather_ranks(ranks).phases["student.train"]
    assert (t.seconds, t.device_seconds, t.tokens, t.flops, t.calls) == (112, 224, 1016, 26, 5)


def _work(ledger: GpuLedger, clock: Clock, seconds: float, tokens: int) -> None:
    with ledger.phase("student.train", devices=2) as m:
        clock.now += seconds
        m.add(tokens, 6.0 * tokens)


def test_processes_merge_through_shards_and_resume_counts_the_base_once(
    clock: Clock, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.json"
    rank0, rank1 = GpuLedger("cpu", devices=2), GpuLedger("cpu", devices=2)
    _work(rank0, clock, 10.0, 7)
    _work(rank1, clock, 12.0, 9)
    rank1.save(path, rank=1)
    assert not path.exists() and accounting.shard_path(path, 1).exists()
    rank0.save(path)
    t = GpuLedger.load(path).phases["student.train"]
    assert (t.tokens, t.flops, t.calls) == (16, 96.0, 1)
    assert t.seconds == pytest.approx(12.0)  # the slowest process, not the sum

    # Resume: both processes start from the merged file; its totals count once.
    rank0, rank1 = GpuLedger.load(path), GpuLedger.load(path)
    _work(rank0, clock, 1.0, 3)
    _work(rank1, clock, 1.0, 4)
    rank1.save(path, rank=1)
    rank0.save(path)
    t = GpuLedger.load(path).phases["student.train"]
    assert (t.tokens, t.calls) == (23, 2)


def test_a_shard_from_an_earlier_session_is_not_merged(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = GpuLedger("cpu", devices=2)
    _work(first, clock, 5.0, 5)
    first.save(path)
    stale = GpuLedger("cpu", devices=2)  # a rank of a session that began before ledger.json
    _work(stale, clock, 5.0, 1000)
    stale.save(path, rank=1)
    resumed = GpuLedger.load(path)  # a one-process resume of the run
    _work(resumed, clock, 1.0, 2)
    resumed.save(path)
    assert GpuLedger.load(path).phases["student.train"].tokens == 7


def test_mfu_against_the_peak_table_and_cpu_has_none(clock: Clock) -> None:
    ledger = GpuLedger("cuda:NVIDIA H200", devices=1)
    with ledger.phase("student.train") as m:
        clock.now += 3600
        m.add(1, 0.5 * 989e12 * 3600)
    assert ledger.mfu()["student.train"] == pytest.approx(0.5)
    assert peak_flops("cuda:NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cuda:NVIDIA L40S") == 362e12
    assert peak_flops("cpu") is None
    cpu = GpuLedger("cpu")
    with cpu.phase("student.train") as m:
        clock.now += 1
        m.add(1, 1e12)
    assert cpu.mfu()["student.train"] is None
    assert cpu.to_json()["unit"] == "CPU device-hours"


def test_bad_device_counts_name_the_fix() -> None:
    with pytest.raises(DistillError, match="teacher-gpus"):
        GpuLedger("cpu", teacher_devices=-1)


def test_flop_formulas_match_the_tiny_model(tokenizer) -> None:  # noqa: ANN001
    shape = TINY_SHAPES["tiny-student"]
    model: Qwen3ForCausalLM = tiny_qwen3(shape, tokenizer, seed=0)
    arch = Architecture(
        name="tiny", layers=shape.layers, hidden=shape.hidden, heads=shape.heads,
        kv_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate=shape.intermediate,
        vocab_rows=shape.vocab_rows,
    )  # fmt: skip
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert arch.matmul_params() == matmul_params(model)
    # The FLOP counter sees every matmul; eager attention shows QKᵀ and AV as full T x T products.
    model.config._attn_implementation = "eager"
    T = 48
    ids = torch.randint(0, len(tokenizer), (2, T))
    width = shape.heads * shape.head_dim
    with FlopCounterMode(display=False) as counter:
        model(ids)
    expected = forward_flops(matmul_params(model), 2 * T, layers=shape.layers,
                             attn_width=width, context=T)  # fmt: skip
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    with FlopCounterMode(display=False) as counter:
        model(ids).logits.sum().backward()
    expected = train_flops(matmul_params(model), 2 * T, layers=shape.layers,
                           attn_width=width, context=T)  # fmt: skip
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_lora_training_flops_leave_out_the_frozen_weight_gradients(tokenizer) -> None:  # noqa: ANN001
    from students import lora

    shape = TINY_SHAPES["tiny-student"]
    model = lora.wrap(tiny_qwen3(shape, tokenizer, seed=0), lora.Config(rank=4, dropout=0.0))
    model.config._attn_implementation = "eager"
    n, trainable = matmul_params(model), matmul_params(model, trainable_only=True)
    assert 0 < trainable < n / 10  # the adapters only
    T = 48
    ids = torch.randint(0, len(tokenizer), (2, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    kw = {"layers": shape.layers, "attn_width": shape.heads * shape.head_dim, "context": T}
    lora_formula = train_flops(n, 2 * T, trainable=trainable, **kw)
    full_formula = train_flops(n, 2 * T, **kw)
    # Exact but for the first layer's q/k/v (base and LoRA A) input gradients, which autograd
    # skips: nothing below them needs a gradient. 6N per token would overcount by a third.
    qkv_in = shape.hidden * (shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim)
    skipped = 2.0 * (2 * T) * (qkv_in + 3 * shape.hidden * 4)
    assert counter.get_total_flops() == pytest.approx(lora_formula - skipped, rel=1e-9)
    assert counter.get_total_flops() < 0.8 * full_formula


def test_flops_and_head_check_see_zero3_partitioned_weights(tiny_pair: TinyPair) -> None:
    """Under ZeRO-3 each weight is an empty local tensor with its real shape in `ds_shape`
    (`ds_numel`): the FLOP count and the head check read those, not the empty shard."""
    model = copy.deepcopy(tiny_pair.student)
    full = matmul_params(model)
    for p in model.parameters():
        p.ds_shape, p.ds_numel = tuple(p.shape), p.numel()  # what deepspeed.zero.Init sets
        p.data = torch.empty(0, dtype=p.dtype)
    assert matmul_params(model) == full
    rows = tiny_pair.student.get_output_embeddings().weight.shape[0]
    check_head(model, rows, "zero3")  # the real rows, not 0
    with pytest.raises(StudentError, match="output rows"):
        check_head(model, rows + 1, "zero3")
