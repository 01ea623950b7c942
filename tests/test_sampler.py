"""The HF student sampler behind the `Sampler` protocol: seeded, per-sequence, current weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.prompts import embedded_prompts
from students.sample import HFSampler, Sampler, SamplingParams
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
