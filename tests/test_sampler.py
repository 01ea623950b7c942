"""The HF student sampler behind the `Sampler` protocol: seeded, per-sequence, current weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.prompts import embedded_prompts
from students.sample import HFSampler, Sampler, SamplingParams, draw, filter_logits
from teachers.chat import render_prompt
from tests.conftest import TinyPair

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def sampler_of(pair: TinyPair) -> HFSampler:
    tok = pair.tokenizer
    return HFSampler(pair.student, eos_id=int(tok.eos_token_id), pad_id=int(tok.pad_token_id),
                     vocab_size=len(tok))  # fmt: skip


def test_hf_sampler_is_a_sampler_seeded_and_varied(tiny_pair: TinyPair) -> None:
    sampler = sampler_of(tiny_pair)
    assert isinstance(sampler, Sampler)
    prompt = render_prompt(tiny_pair.tokenizer, embedded_prompts(1, 0, "t")[0].messages, "think")
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=5)
    a = sampler.generate([prompt] * 3, params)
    b = sampler.generate([prompt] * 3, params)
    assert [g.token_ids.tolist() for g in a] == [g.token_ids.tolist() for g in b]
    assert len({tuple(g.token_ids.tolist()) for g in a}) > 1  # G copies of a prompt differ
    assert all(int(g.token_ids.max()) < len(tiny_pair.tokenizer) for g in a)  # no padded rows
    assert tiny_pair.student.training is False  # generate restores the mode it found


def test_hf_sampler_samples_the_current_weights(tiny_pair: TinyPair) -> None:
    sampler = sampler_of(tiny_pair)
    prompt = render_prompt(tiny_pair.tokenizer, embedded_prompts(1, 1, "t")[0].messages, "think")
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    before = sampler.generate([prompt], greedy)[0].token_ids
    state = {k: v.clone() for k, v in tiny_pair.student.state_dict().items()}
    try:
        with torch.no_grad():
            tiny_pair.student.lm_head.weight.mul_(-1.0)  # flips the greedy choice everywhere
        sampler.sync(tiny_pair.student)
        after = sampler.generate([prompt], greedy)[0].token_ids
        assert not np.array_equal(before, after)
    finally:
        tiny_pair.student.load_state_dict(state)
    with pytest.raises(AssertionError):
        sampler.sync(tiny_pair.teacher)  # it can only sample the model it was built with


def test_draw_has_the_distribution_it_is_given() -> None:
    """Inverse-CDF draws against the probabilities: a chi-square test over 200,000 draws, ids
    of probability 0 never drawn, and a fixed seed draws the same ids."""
    probs = torch.tensor([0.0, 0.05, 0.0, 0.25, 0.6, 0.1, 0.0])
    rows = probs.expand(200_000, -1)
    ids = draw(rows, torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    expected = probs[probs > 0].double() * rows.shape[0]
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, chi2  # 3 degrees of freedom: P(chi2 > 16.3) = 0.001
    again = draw(rows, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    unnormalised = draw(probs[None] * 3.0, torch.Generator().manual_seed(1))  # mass need not be 1
    assert float(probs[int(unnormalised)]) > 0


def test_a_draw_at_the_total_goes_to_the_last_id_that_has_mass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch.rand lies in [0, 1), but u * total may round up to the total.
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw["dtype"]))
    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert draw(probs, torch.Generator()).tolist() == [1, 3]


def naive_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p over the whole sorted row (transformers' order)."""
    z = logits.double() / params.temperature
    out = torch.full_like(z, float("-inf"))
    for b in range(z.shape[0]):
        order = torch.argsort(z[b], descending=True)
        keep = order[: params.top_k] if params.top_k else order
        if params.top_p < 1.0:  # 1.0: off (the mass above the last ids may round to 1)
            p = torch.softmax(z[b, keep], -1)
            before = torch.cumsum(p, -1) - p  # mass of the ids ranked above each one
            keep = keep[before < params.top_p]
        out[b, keep] = z[b, keep]
    return out


@pytest.mark.parametrize("top_k, top_p", [(20, 0.95), (20, 0.8), (0, 0.9), (5, 1.0), (0, 1.0)])
def test_filter_logits_matches_a_naive_filter(top_k: int, top_p: float) -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(top_k)) * 3
    params = SamplingParams(temperature=0.6, top_k=top_k, top_p=top_p)
    got, want = filter_logits(logits, params), naive_filter(logits, params)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = ~torch.isinf(want)
    torch.testing.assert_close(got[kept].double(), want[kept], rtol=1e-6, atol=1e-6)
