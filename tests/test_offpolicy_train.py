"""Off-policy trainer: loss masking, accumulation = one batch, exact resume, KD, bad input."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from distill import teacher_data
from distill.accounting import GpuLedger
from distill.batch import Example, collate
from distill.errors import DistillError
from distill.loop import global_target_tokens
from distill.offpolicy import train as offpolicy
from distill.tasks import problems, response_text
from teachers.chat import render_prompt
from teachers.hf import HFTeacher


def write_data(directory: Path, tokenizer, n: int, teacher: HFTeacher | None = None) -> None:  # type: ignore[no-untyped-def]
    """n worked solutions per mode as kept rows in the teacher-data schema (top-k if teacher)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for p in problems(n, 0, "train-test"):
        messages = [{"role": "user", "content": p.prompt}]
        for mode in ("think", "no_think"):
            prompt = render_prompt(tokenizer, messages, mode)  # type: ignore[arg-type]
            text = response_text(p, thinking=mode == "think")
            text = text if mode == "think" else text.split("</think>\n\n", 1)[1]
            response = tokenizer.encode(text, add_special_tokens=False) + [eos]
            row = {
                **dict.fromkeys(f.name for f in teacher_data.SCHEMA),
                "key": teacher_data.row_key(p.id, mode, 0),
                "prompt_id": p.id,
                "mode": mode,
                "sample": 0,
                "messages": messages,
                "prompt_ids": prompt,
                "response_ids": response,
                "forced": [False] * len(response),
                "finish_reason": "stop",
                "verdict": "kept",
            }
            if teacher is not None:
                (s,) = teacher.score([prompt + response], [len(prompt)], 4)
                row |= {
                    "topk_ids": s.ids.tolist(),
                    "topk_logprobs": s.logprobs.tolist(),
                    "topk_actual_logprobs": s.actual_logprobs.tolist(),
                }
            rows.append(row)
    directory.mkdir(parents=True, exist_ok=True)
    schema = teacher_data.schema(4 if teacher is not None else 0)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), directory / "shard-00000.parquet")


@pytest.fixture(scope="module")
def data(tiny_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("offpolicy_data")
    write_data(root / "plain", tiny_pair.tokenizer, 8)
    write_data(
        root / "topk", tiny_pair.tokenizer, 4, HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    )
    return root


def config(run_dir: Path, student: Path, data_dir: Path, **kw: object) -> offpolicy.Config:
    """Tiny settings; `kw` overrides any field."""
    base = offpolicy.Config(
        run_dir=run_dir,
        student=str(student),
        data_dir=data_dir,
        steps=3,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        save_every=100,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


class Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.metrics: dict[int, Mapping[str, float]] = {}
        self.stop_at = stop_at

    def __call__(self, phase: str, step: int, total: int, metrics: Mapping[str, float]) -> None:
        if step == self.stop_at:
            raise KeyboardInterrupt("simulated kill")
        self.metrics[step] = dict(metrics)


class FixedLogits(torch.nn.Module):
    """A 'student' whose logits are a parameter: the gradient shows which positions carry loss."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def test_only_sampled_response_tokens_carry_loss(tiny_pair) -> None:
    forced = np.array([False, True, True, False, False])
    ex = [
        Example(prompt_ids=[5, 6, 7], response_ids=[8, 9, 10, 11, 12], train=~forced),
        Example(prompt_ids=[5, 6], response_ids=[13, 14], train=np.ones(2, bool)),
    ]
    batch = collate(ex, pad_id=0)  # (2, 8): row 1 is right-padded
    student = FixedLogits(torch.randn(2, 8, 512))
    cfg = offpolicy.Config(run_dir=Path("."), student="x")
    total, ce = offpolicy.micro_batch_loss(student, batch, cfg, vocab_size=500)
    total.backward()
    assert student.logits.grad is not None
    carries = student.logits.grad.abs().sum(-1) > 0  # (2, 8): position j-1 predicts token j
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, [2, 5, 6]] = True  # targets 8, 11, 12 (9, 10 forced; prompt never)
    expected[1, [1, 2]] = True  # targets 13, 14; padding never
    assert torch.equal(carries, expected)
    logp = torch.log_softmax(student.logits.detach()[..., :500], -1)
    by_hand = -(logp[0, 2, 8] + logp[0, 5, 11] + logp[0, 6, 12] + logp[1, 1, 13] + logp[1, 2, 14])
    assert torch.allclose(total.detach(), by_hand) and torch.allclose(ce, by_hand)


def test_think_block_target_moves_the_empty_block_into_the_response(tiny_pair, data) -> None:
    tok = tiny_pair.tokenizer
    plain = offpolicy.load_examples(data / "plain", False)
    moved = offpolicy.load_examples(data / "plain", False, tok, think_block="target")
    for a, b in zip(plain, moved, strict=True):
        if "/no_think" not in tok.decode(list(b.prompt_ids)):
            assert list(a.prompt_ids) == list(b.prompt_ids)  # think rows unchanged
            assert list(a.response_ids) == list(b.response_ids)
            continue
        block = list(b.response_ids)[: len(b.response_ids) - len(a.response_ids)]
        assert tok.decode(block) == "<think>\n\n</think>\n\n" and b.train[: len(block)].all()
        assert list(b.response_ids)[len(block) :] == list(a.response_ids)


def test_two_micro_batches_give_the_gradient_of_one_batch(tiny_pair, data) -> None:
    examples = offpolicy.load_examples(data / "plain", False)[:4]
    cfg = offpolicy.Config(run_dir=Path("."), student="x")
    accelerator, _ = offpolicy.make_accelerator(cfg)
    grads = []
    for micro_size in (4, 2):
        model = copy.deepcopy(tiny_pair.student).train()
        micro = [collate(examples[i : i + micro_size], 0) for i in range(0, 4, micro_size)]
        n_tokens = global_target_tokens(micro, accelerator)
        for mb in micro:
            total, _ = offpolicy.micro_batch_loss(model, mb, cfg, 500)
            (total / n_tokens).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # type: ignore[union-attr]
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_accumulation_in_the_loop_matches_one_batch(tmp_path, tiny_pair, data) -> None:
    logs = []
    for micro in (4, 2, 1):
        rec = Recorder()
        cfg = config(
            tmp_path / f"m{micro}",
            tiny_pair.student_dir,
            data / "plain",
            steps=1,
            micro_batch_size=micro,
        )
        offpolicy.train(cfg, GpuLedger(), rec)
        logs.append(rec.metrics[1])
    for m in logs[1:]:
        assert abs(m["loss"] - logs[0]["loss"]) < 1e-5
        assert abs(m["grad_norm"] - logs[0]["grad_norm"]) < 1e-4 * logs[0]["grad_norm"]


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_pair, data) -> None:
    # Dropout makes the RNG state matter: a resume that forgot it would draw other masks.
    student = tmp_path / "student"
    shutil.copytree(tiny_pair.student_dir, student)
    cfg_file = student / "config.json"
    cfg_file.write_text(
        cfg_file.read_text().replace('"attention_dropout": 0.0', '"attention_dropout": 0.3')
    )
    assert '"attention_dropout": 0.3' in cfg_file.read_text()
    run = {"student": student, "data_dir": data / "plain", "steps": 4, "save_every": 2}
    small = {"batch_size": 2, "micro_batch_size": 1}
    whole = Recorder()
    offpolicy.train(config(tmp_path / "a", **run, **small), GpuLedger(), whole)  # type: ignore[arg-type]
    cut = config(tmp_path / "b", **run, **small)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        offpolicy.train(cut, GpuLedger(), Recorder(stop_at=4))  # dies before saving step 4
    resumed = Recorder()
    offpolicy.train(cut, GpuLedger(), resumed)
    assert sorted(resumed.metrics) == [3, 4]  # restarted after the checkpoint of step 2
    for step in (3, 4):
        for k in ("loss", "grad_norm", "lr"):
            want = whole.metrics[step][k]
            assert resumed.metrics[step][k] == pytest.approx(want, rel=1e-6, abs=1e-7)
    a = load_file(tmp_path / "a" / "offpolicy" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "offpolicy" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_kd_on_stored_topk_adds_to_the_cross_entropy(tmp_path, tiny_pair, data) -> None:
    rec = Recorder()
    cfg = config(tmp_path, tiny_pair.student_dir, data / "topk", steps=1, kd_weight=0.5)
    offpolicy.train(cfg, GpuLedger(), rec)
    m = rec.metrics[1]
    assert np.isfinite(m["loss"]) and m["loss"] > m["ce"] > 0
    with pytest.raises(DistillError, match="--store-topk"):
        offpolicy.train(replace(cfg, data_dir=data / "plain"), GpuLedger())


def test_bad_settings_are_refused_before_training(tmp_path, tiny_pair, data) -> None:
    base = config(tmp_path, tiny_pair.student_dir, data / "plain")
    with pytest.raises(DistillError, match="multiple of --micro-batch-size"):
        offpolicy.train(replace(base, micro_batch_size=3), GpuLedger())
    with pytest.raises(DistillError, match="fewer than --batch-size 64"):
        offpolicy.train(replace(base, batch_size=64, micro_batch_size=8), GpuLedger())
    with pytest.raises(DistillError, match="pip install tensorboard"):
        offpolicy.train(replace(base, report_to="tensorboard"), GpuLedger())
    offpolicy.train(replace(base, steps=1), GpuLedger())
    changed = tmp_path / "changed"
    shutil.copytree(data / "plain", changed)
    table = pq.read_table(changed / "shard-00000.parquet").slice(0, 12)
    pq.write_table(table, changed / "shard-00000.parquet")
    with pytest.raises(DistillError, match="changed since checkpoint"):
        offpolicy.train(replace(base, data_dir=changed, steps=2), GpuLedger())


def test_the_loops_step_with_torch_fused_adamw(tmp_path, tiny_pair) -> None:
    """load_trainee builds torch's fused AdamW where the parameters' device has it (CPU, CUDA)."""
    from distill.loop import fused_adamw, load_trainee, make_accelerator

    student = str(tiny_pair.student_dir)
    accelerator, precision = make_accelerator("float32", student)
    trainee = load_trainee(accelerator, student=student, out=tmp_path, precision=precision,
                           lora_config=None, lr=1e-3, fused_loss=True)  # fmt: skip
    optimizer = getattr(trainee.optimizer, "optimizer", trainee.optimizer)  # accelerate's wrapper
    assert optimizer.defaults["fused"] is True
    assert not fused_adamw([torch.nn.Parameter(torch.empty(2, device="meta"))])
    assert not fused_adamw([])
