"""The loops' fused-linear loss (distill/fused_loss.py): the same loss, gradients, diagnostics
and updated weights as the logits path on the tiny pair (500 real ids on a 512-row head), the
fallbacks with their logged reason, and exact resume on the fused path."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

from distill.accounting import GpuLedger
from distill.batch import Batch, Example, collate
from distill.fused_loss import ce_topk_loss, choose_loss_path, last_hidden, topk_loss
from distill.logits_loss import topk_divergence
from distill.offpolicy import train as offpolicy
from distill.onpolicy import train as onpolicy
from distill.onpolicy.metrics import Diagnostics, accumulate, accumulate_rows
from distill.prompts import embedded_prompts
from losses import Divergence, DivergenceSpec, fused_linear_divergence_sum
from losses.teacher_data import TeacherTopK
from students.tiny import TINY_SHAPES, tiny_qwen3
from teachers.hf import HFTeacher
from teachers.protocol import TopK
from tests.conftest import TinyPair
from tests.test_onpolicy_train import Recorder

FAST = {"max_tokens": 16, "prompts_per_step": 4, "samples_per_prompt": 2, "warmup_steps": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _batch(K: int = 8, seed: int = 0) -> tuple[Batch, torch.Tensor]:
    """(batch with teacher top-k incl. padded-row and -1 ids, measured (B, T) wider than mask)."""
    rng = np.random.default_rng(seed)
    examples, measured = [], []
    for P, R in ((5, 9), (3, 6), (7, 4)):
        ids = np.stack([rng.permutation(512)[:K] for _ in range(R)]).astype(np.int32)  # (R, K)
        ids[0, 0], ids[1, -1] = 507, -1  # a padded head row and "no entry" are dropped
        lp = np.log(rng.dirichlet(np.ones(K), size=R) * 0.9).astype(np.float32)  # (R, K)
        topk = TopK(ids=ids, logprobs=lp, actual_logprobs=np.zeros(R, np.float32))
        train = rng.random(R) < 0.7
        train[0] = True
        prompt, response = rng.integers(0, 500, P).tolist(), rng.integers(0, 500, R).tolist()
        examples.append(Example(prompt_ids=prompt, response_ids=response, train=train, topk=topk))
        measured.append((P, R))
    batch = collate(examples, pad_id=0)
    shown = torch.zeros_like(batch.loss_mask)
    for b, (P, R) in enumerate(measured):
        shown[b, P : P + R] = True  # measured: every response token, loss or not
    return batch, shown


def _student(seed: int = 2) -> Qwen3ForCausalLM:
    from distill.tasks import corpus
    from students.tiny import train_tokenizer

    tok = train_tokenizer(corpus(60, seed=0), vocab_size=500)
    return tiny_qwen3(TINY_SHAPES["tiny-student"], tok, seed=seed)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].abs().max()) + 1e-12
        assert float((a[k] - b[k]).abs().max()) <= rel * scale, k


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_topk_loss_equals_logits_path_with_grads_and_diagnostics(kind: Divergence) -> None:
    model = _student()
    batch, measured = _batch()
    n_tokens = 7.0
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_token, _ = topk_divergence(logits, batch, DivergenceSpec(kind), 500)
    (per_token.sum() / n_tokens).backward()
    ref_diag = Diagnostics()
    accumulate(ref_diag, logits, batch, measured, 500)
    ref = _grads(model)
    diag = Diagnostics()
    weight = model.lm_head.weight
    share, summed = topk_loss(
        model,
        weight,
        batch,
        n_tokens,
        DivergenceSpec(kind),
        500,
        measured=measured,
        observe=partial(accumulate_rows, diag, vocab_size=500),
    )
    share.backward()
    fused = _grads(model)
    assert abs(float(summed) - float(per_token.sum())) <= 1e-5 * abs(float(per_token.sum()))
    assert abs(float(share) - float(per_token.sum()) / n_tokens) <= 1e-5 * float(share)
    _assert_close(ref, fused, 1e-5)
    assert float(fused["lm_head.weight"][500:].abs().max()) == 0.0  # padded head rows
    assert diag.tokens == ref_diag.tokens > batch.n_targets  # measured rows without loss too
    for name, value in ref_diag.means().items():
        assert abs(diag.means()[name] - value) < 1e-5, name


@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_offpolicy_ce_kd_loss_equals_logits_path(kd_weight: float) -> None:
    model = _student()
    batch, _ = _batch(seed=1)
    cfg = offpolicy.Config(run_dir=Path("unused"), student="unused", kd_weight=kd_weight)
    total, ce = offpolicy.micro_batch_loss(model, batch, cfg, 500)
    (total / 5.0).backward()
    ref = _grads(model)
    weight = model.lm_head.weight
    share, f_total, f_ce = ce_topk_loss(model, weight, batch, 5.0, 500, kd_weight=kd_weight)
    share.backward()
    fused = _grads(model)
    assert abs(float(f_total) - float(total)) <= 1e-5 * float(total)
    assert abs(float(f_ce) - float(ce)) <= 1e-5 * float(ce)
    assert abs(float(share) - float(total) / 5.0) <= 1e-5 * float(share)
    _assert_close(ref, fused, 1e-5)


def test_last_hidden_is_the_state_lm_head_consumes_without_logits() -> None:
    model = _student()
    batch, _ = _batch()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    h = last_hidden(model, batch)  # (B, T, H)
    assert torch.allclose(model.lm_head(h), logits, atol=1e-5)


def test_no_loss_rows_give_zero_gradients_not_garbage() -> None:
    weight = torch.randn(12, 4, requires_grad=True)
    hidden = torch.randn(0, 4, requires_grad=True)
    teacher = TeacherTopK(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    loss, values = fused_linear_divergence_sum(
        hidden, weight, teacher, "reverse_kl", torch.zeros(0), vocab_size=10
    )
    loss.backward()
    assert values.shape == (0,) and float(loss) == 0.0
    assert weight.grad is not None and float(weight.grad.abs().max()) == 0.0


def test_fallbacks_pick_the_logits_path_and_log_why(caplog: pytest.LogCaptureFixture) -> None:
    accelerator = Accelerator(cpu=True)
    model = _student()
    caplog.set_level(logging.INFO, logger="distill.fused_loss")
    assert choose_loss_path(True, accelerator, model).fused
    assert not choose_loss_path(False, accelerator, model).fused
    model.config.final_logit_softcapping = 30.0  # type: ignore[attr-defined]
    capped = choose_loss_path(True, accelerator, model)
    assert not capped.fused and "final_logit_softcapping" in capped.reason
    model.config.final_logit_softcapping = None  # type: ignore[attr-defined]
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(512))
    assert "bias" in choose_loss_path(True, accelerator, model).reason
    model.lm_head.register_parameter("bias", None)
    assert choose_loss_path(True, accelerator, model).fused  # back to a plain Linear: fused again
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("final_logit_softcapping" in m for m in warned), warned
    assert any("bias" in m for m in warned), warned


def test_probe_refuses_a_head_whose_logits_are_not_lm_head_of_h() -> None:
    model = _student()

    def scale(
        module: torch.nn.Module, args: tuple[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        return out / 3.0  # e.g. a final logit scale the config does not name

    model.lm_head.register_forward_hook(scale)
    head = choose_loss_path(True, Accelerator(cpu=True), model)
    assert not head.fused and "differs from the model's logits" in head.reason


def _assert_same_update(
    before: dict[str, torch.Tensor], a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> None:
    """One AdamW step moves each weight by ~lr·g/(|g| + eps). Where |g| is near eps (head rows
    of improbable tokens) fp32-level gradient differences (checked at 1e-5 in the unit tests)
    move single elements by ~1% of lr; over the whole model the two updates agree to 1e-3."""
    diff = sum(float((a[k] - b[k]).square().sum()) for k in b)
    size = sum(float((b[k] - before[k]).square().sum()) for k in b)
    assert size > 0 and diff <= 1e-6 * size, (diff, size)  # ‖Δa - Δb‖ ≤ 1e-3 ‖Δb‖


def _config(run_dir: Path, student: Path, **kw: object) -> onpolicy.Config:
    return onpolicy.Config(run_dir=run_dir, student=str(student), **{**FAST, **kw})  # type: ignore[arg-type]


def test_onpolicy_step_fused_equals_logits_path(tiny_pair: TinyPair, tmp_path: Path) -> None:
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    prompts = embedded_prompts(8, 0, "train")
    runs = {}
    for fused in (True, False):
        rec = Recorder()
        cfg = _config(tmp_path / str(fused), tiny_pair.student_dir, steps=1, fused_loss=fused,
                      lr=1e-3, grad_clip=1e9)  # fmt: skip
        onpolicy.train(cfg, teacher, prompts, GpuLedger(), rec)
        weights = load_file(tmp_path / str(fused) / "onpolicy" / "checkpoint" / "model.safetensors")
        runs[fused] = (rec.steps[0], weights)
    (m_f, w_f), (m_l, w_l) = runs[True], runs[False]
    assert m_f["fused_loss"] == 1.0 and m_l["fused_loss"] == 0.0
    assert abs(m_f["loss"] - m_l["loss"]) <= 1e-5 * m_l["loss"], (m_f, m_l)
    assert abs(m_f["grad_norm"] - m_l["grad_norm"]) <= 1e-5 * m_l["grad_norm"]
    for name in ("kl", "teacher_topk_mass", "topk_overlap"):
        assert abs(m_f[name] - m_l[name]) < 1e-5, name
    _assert_same_update(load_file(tiny_pair.student_dir / "model.safetensors"), w_f, w_l)


def test_onpolicy_fused_resume_is_exact(tiny_pair: TinyPair, tmp_path: Path) -> None:
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    prompts = embedded_prompts(16, 0, "train")
    kw = {"steps": 3, "save_every": 1, "lr": 3e-3}
    whole = Recorder()
    onpolicy.train(_config(tmp_path / "a", tiny_pair.student_dir, **kw), teacher, prompts,
                   GpuLedger(), whole)  # fmt: skip
    run_b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        onpolicy.train(_config(run_b, tiny_pair.student_dir, **kw), teacher, prompts,
                       GpuLedger(), Recorder(stop_after=2))  # fmt: skip
    resumed = Recorder()
    ledger = GpuLedger.load(run_b / "ledger.json")
    onpolicy.train(_config(run_b, tiny_pair.student_dir, **kw), teacher, prompts, ledger, resumed)
    # killed while logging step 2, before its checkpoint: steps 2 and 3 run again
    assert [m["fused_loss"] for m in resumed.steps] == [1.0, 1.0]
    for a, b in zip(whole.steps[1:], resumed.steps, strict=True):
        assert a["loss"] == b["loss"] and a["kl"] == b["kl"], (a, b)
    wa = load_file(tmp_path / "a" / "onpolicy" / "checkpoint" / "model.safetensors")
    wb = load_file(run_b / "onpolicy" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_offpolicy_kd_step_fused_equals_logits_path(tiny_pair: TinyPair, tmp_path: Path) -> None:
    from tests.test_offpolicy_train import write_data

    data = tmp_path / "topk"
    write_data(data, tiny_pair.tokenizer, 4, HFTeacher.from_pretrained(tiny_pair.teacher_dir))
    logs, weights = {}, {}
    for fused in (True, False):
        run = tmp_path / str(fused)
        cfg = offpolicy.Config(run_dir=run, student=str(tiny_pair.student_dir), data_dir=data,
                               steps=1, batch_size=4, micro_batch_size=2, lr=1e-3,
                               warmup_steps=1, kd_weight=0.5, fused_loss=fused)  # fmt: skip
        rec = Recorder()
        offpolicy.train(cfg, GpuLedger(), rec)
        logs[fused] = rec.steps[0]
        weights[fused] = load_file(run / "offpolicy" / "checkpoint" / "model.safetensors")
    assert (logs[True]["fused_loss"], logs[False]["fused_loss"]) == (1.0, 0.0)
    for name in ("loss", "ce", "grad_norm"):
        assert abs(logs[True][name] - logs[False][name]) <= 1e-5 * logs[False][name], name
    before = load_file(tiny_pair.student_dir / "model.safetensors")
    _assert_same_update(before, weights[True], weights[False])


def test_cli_no_fused_loss_reaches_the_loop(tiny_pair: TinyPair, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from cli import app

    args = ["onpolicy", "--run-dir", str(tmp_path), "--teacher", str(tiny_pair.teacher_dir),
            "--student", str(tiny_pair.student_dir), "--steps", "1", "--prompts-per-step", "2",
            "--max-tokens", "8", "--n-prompts", "8", "--no-fused-loss"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "config.json").read_text())["onpolicy"]["fused_loss"] is False
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["fused_loss"] for r in rows if r.get("phase") == "onpolicy"] == [0.0]


def test_diagnostics_take_a_teacher_top_k_wider_than_the_real_vocabulary() -> None:
    """K up to the head's width (padded rows included) is a valid request: the student's top-k
    overlap is then taken over every real id, and every real id is in the teacher's top-k."""
    torch.manual_seed(0)
    vocab, width, rows = 6, 8, 5
    logits = torch.randn(rows, width)  # (N, W)
    t_ids = torch.arange(width).expand(rows, width).contiguous()  # (N, K = W)
    t_lp = torch.log_softmax(torch.randn(rows, width), dim=-1)  # (N, K)
    diag = Diagnostics()
    accumulate_rows(diag, logits, t_ids, t_lp, torch.ones(rows), vocab)
    means = diag.means()
    assert means["topk_overlap"] == 1.0
    assert 0.0 < means["teacher_topk_mass"] < 1.0  # padded rows' mass is not counted
