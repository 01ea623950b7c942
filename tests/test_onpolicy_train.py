"""On-policy distillation on the tiny pair: learning, zero loss at equality, masking, mixing,
truncation, exact resume, and the refusals of bad input."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from distill import evaluate
from distill.accounting import GpuLedger
from distill.batch import collate
from distill.errors import DistillError
from distill.logits_loss import topk_divergence
from distill.onpolicy import train as onpolicy
from distill.onpolicy.rollout import Rollout
from distill.prompts import embedded_prompts
from losses import DivergenceSpec
from students.sample import Generation
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3
from teachers.chat import render_prompt
from teachers.hf import HFTeacher
from teachers.protocol import TopK
from tests.conftest import TinyPair

FAST = {"max_tokens": 16, "prompts_per_step": 4, "samples_per_prompt": 2, "warmup_steps": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def teacher(tiny_pair: TinyPair) -> HFTeacher:
    return HFTeacher.from_pretrained(tiny_pair.teacher_dir)


def config(run_dir: Path, student: Path, **kw: object) -> onpolicy.Config:
    return onpolicy.Config(run_dir=run_dir, student=str(student), **{**FAST, **kw})  # type: ignore[arg-type]


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.steps: list[dict[str, float]] = []
        self.stop_after = stop_after

    def __call__(self, phase: str, step: int, total: int, metrics: Mapping[str, float]) -> None:
        self.steps.append(dict(metrics))
        if self.stop_after is not None and step == self.stop_after:
            raise KeyboardInterrupt  # a kill between two checkpoints


def test_heldout_student_kl_falls_over_20_steps(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    held = embedded_prompts(6, 0, "eval")
    ev = evaluate.Config(prompts=6, top_k=16, max_tokens=16, seed=7)

    def heldout_rkl(model_dir: Path) -> float:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return evaluate.onpolicy_divergence(
            model, teacher, tiny_pair.tokenizer, held, ["think", "no_think"], ev, GpuLedger()
        )

    before = heldout_rkl(tiny_pair.student_dir)
    cfg = config(tmp_path, tiny_pair.student_dir, steps=20, lr=3e-3, save_every=100)
    summary = onpolicy.train(cfg, teacher, embedded_prompts(64, 0, "train"), GpuLedger())
    after = heldout_rkl(summary.checkpoint)
    assert np.isfinite(summary.final_loss)
    assert after < 0.8 * before, (before, after)


def test_student_equal_to_teacher_gives_zero_loss_and_gradient(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    # A head without padded rows: the served teacher normalises over its whole head (as vLLM),
    # the student over the real vocabulary, so padded rows with mass would differ by design.
    shape = replace(TINY_SHAPES["tiny-student"], vocab_rows=len(tiny_pair.tokenizer))
    same = tmp_path / "same"
    save_pretrained(tiny_qwen3(shape, tiny_pair.tokenizer, seed=3), tiny_pair.tokenizer, same)
    rec = Recorder()
    cfg = config(tmp_path, same, steps=1, lr=0.0, top_k=32)
    onpolicy.train(cfg, HFTeacher.from_pretrained(same), embedded_prompts(8, 0, "train"),
                   GpuLedger(), rec)  # fmt: skip
    m = rec.steps[0]
    assert m["loss_tokens"] > 0
    assert abs(m["loss"]) < 1e-5 and m["kl"] < 1e-5, m
    assert m["grad_norm"] < 1e-4, m
    assert m["topk_overlap"] > 0.99, m


def _rollout(prompt: list[int], response: list[int], forced: list[bool], truncated: bool,
             K: int, rng: np.random.Generator) -> Rollout:  # fmt: skip
    R = len(response)
    ids = np.stack([rng.permutation(500)[:K] for _ in range(R)]).astype(np.int32)  # (R, K)
    lp = np.sort(np.log(rng.dirichlet(np.ones(K)) * 0.9), axis=-1)[::-1].astype(np.float32)
    scores = TopK(ids=ids, logprobs=np.tile(lp, (R, 1)), actual_logprobs=np.zeros(R, np.float32))
    g = Generation(
        token_ids=np.asarray(response, np.int32),
        finish_reason="length" if truncated else "stop",
        forced=np.asarray(forced, bool),
    )
    return Rollout(prompt_ids=prompt, generation=g, mode="think", on_policy=True, scores=scores)


def test_prompt_and_forced_tokens_carry_no_loss() -> None:
    rng = np.random.default_rng(0)
    forced = [False, False, True, True, True, False, False]
    rollouts = [
        _rollout([1, 2, 3, 4], [10, 11, 12, 13, 14, 15, 16], forced, False, 8, rng),
        _rollout([5, 6], [20, 21, 22], [False] * 3, True, 8, rng),
    ]
    logits = torch.randn(2, 11, 512)
    for truncation, second_trained in (("keep", True), ("mask", False)):
        examples = onpolicy.build_examples(rollouts, truncation)  # type: ignore[arg-type]
        batch = collate(examples, pad_id=0)
        expect = torch.zeros(2, 11, dtype=torch.bool)
        expect[0, 4:11] = torch.tensor([not f for f in forced])
        expect[1, 2:5] = second_trained
        assert torch.equal(batch.loss_mask, expect), truncation
        # Changing the teacher at prompt and forced positions changes nothing.
        per_token, _ = topk_divergence(logits, batch, DivergenceSpec("reverse_kl"), 500)
        assert batch.teacher_logprobs is not None and batch.teacher_ids is not None
        moved = replace(
            batch,
            teacher_ids=torch.where(expect[..., None], batch.teacher_ids, 7),
            teacher_logprobs=torch.where(expect[..., None], batch.teacher_logprobs, -0.01),
        )
        again, _ = topk_divergence(logits, moved, DivergenceSpec("reverse_kl"), 500)
        assert torch.equal(per_token, again)
        assert bool((per_token[~expect[:, 1:]] == 0).all())


def write_teacher_rows(out: Path, pair: TinyPair, modes: tuple[str, ...]) -> None:
    """A teacher dataset shard as `distill generate` writes it (the columns on-policy reads)."""
    rows = []
    for i, p in enumerate(embedded_prompts(4, 1, "train")):
        for mode in modes:
            prompt = render_prompt(pair.tokenizer, p.messages, mode)  # type: ignore[arg-type]
            response = pair.tokenizer.encode(f"{p.answer}<|im_end|>", add_special_tokens=False)
            rows.append({
                "key": f"{i}|{mode}|0", "mode": mode, "verdict": "kept" if i else "wrong",
                "finish_reason": "stop", "prompt_ids": prompt, "response_ids": response,
                "forced": [False] * len(response),
            })  # fmt: skip
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "shard-00000.parquet")


def test_lmbda_mixes_teacher_rows_in_the_stated_share(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    prompts = embedded_prompts(6, 0, "train")
    write_teacher_rows(tmp_path / "teacher_data", tiny_pair, ("think", "no_think"))
    rec = Recorder()
    cfg = config(tmp_path, tiny_pair.student_dir, steps=3, lmbda=0.5, save_every=100)
    onpolicy.train(cfg, teacher, prompts, GpuLedger(), rec)
    shares = [m["offpolicy_fraction"] for m in rec.steps]
    assert shares == [0.5, 0.5, 0.5], shares
    assert all(m["loss_tokens"] > 0 and np.isfinite(m["loss"]) for m in rec.steps)


def test_resume_equals_an_uninterrupted_run(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    prompts = embedded_prompts(16, 0, "train")
    kw = {"steps": 4, "save_every": 2, "lr": 3e-3, "thinking_budget": 6, "lmbda": 0.0}
    whole = Recorder()
    onpolicy.train(config(tmp_path / "a", tiny_pair.student_dir, **kw), teacher, prompts,
                   GpuLedger(), whole)  # fmt: skip
    killed = Recorder(stop_after=3)
    run_b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        onpolicy.train(config(run_b, tiny_pair.student_dir, **kw), teacher, prompts,
                       GpuLedger(), killed)  # fmt: skip
    resumed = Recorder()
    ledger = GpuLedger.load(run_b / "ledger.json")
    onpolicy.train(config(run_b, tiny_pair.student_dir, **kw), teacher, prompts, ledger, resumed)
    assert len(resumed.steps) == 2  # steps 2 and 3 again, from the checkpoint after step 1
    for a, b in zip(whole.steps[2:], resumed.steps, strict=True):
        assert a["loss"] == b["loss"] and a["kl"] == b["kl"], (a, b)
    wa = load_file(tmp_path / "a" / "onpolicy" / "checkpoint" / "model.safetensors")
    wb = load_file(run_b / "onpolicy" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(run_b / "onpolicy" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["prompt_position"]) == (3, 16)
    assert ledger.phases["student.train"].calls == 4  # 2 before the kill's checkpoint + 2 after


def test_truncation_drop_removes_truncated_responses(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    rec = Recorder()
    # A random student rarely stops within 4 tokens: most responses hit the limit.
    cfg = config(tmp_path, tiny_pair.student_dir, steps=1, max_tokens=4, truncation="drop")
    onpolicy.train(cfg, teacher, embedded_prompts(8, 0, "train"), GpuLedger(), rec)
    m = rec.steps[0]
    assert m["truncation_rate"] > 0.5
    kept = round((1 - m["truncation_rate"]) * 8)
    assert m["loss_tokens"] <= 4 * kept


def test_bad_requests_are_refused_before_anything_is_written(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    prompts = embedded_prompts(4, 0, "train")
    cases = [
        ({"top_k": teacher.max_top_k + 1}, "--top-k"),
        ({"think_ratio": 0.0}, "no prompts in mode think"),
        ({"think_ratio": 1.0}, "no prompts in mode no_think"),
        ({"divergence": "kl"}, "--divergence"),
        ({"truncation": "cut"}, "--truncation"),
        ({"lmbda": 1.5}, "--lmbda"),
    ]
    for kw, message in cases:
        with pytest.raises(DistillError, match=message):
            onpolicy.train(config(tmp_path / "x", tiny_pair.student_dir, **kw), teacher, prompts,
                           GpuLedger())  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_lmbda_needs_teacher_rows_in_every_requested_mode(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    prompts = embedded_prompts(3, 0, "train")
    write_teacher_rows(tmp_path / "teacher_data", tiny_pair, ("think",))
    cfg = config(tmp_path, tiny_pair.student_dir, lmbda=0.25)
    with pytest.raises(DistillError, match="no kept rows in mode no_think"):
        onpolicy.train(cfg, teacher, prompts, GpuLedger())
