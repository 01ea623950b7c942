"""Sampled evaluation: the pass@k estimator, verification wiring, budget curve, determinism."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyPair
from transformers import PreTrainedTokenizerFast

from distill import evaluate
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.prompts import Prompt
from students.sample import Generation, HFSampler, SamplingParams
from teachers.chat import BUDGET_SENTENCE


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_pass_at_k_matches_its_closed_form(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_is_the_chance_a_k_subset_holds_a_correct_sample() -> None:
    samples = [True, False, False, True, False, False]  # n = 6, c = 2
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        share = sum(any(s) for s in subsets) / len(subsets)
        assert evaluate.pass_at_k(6, 2, k) == pytest.approx(share, abs=1e-12)
    assert evaluate.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert evaluate.pass_at_k(5, 3, 3) == 1.0 and evaluate.pass_at_k(8, 0, 8) == 0.0


def test_k_larger_than_n_is_refused() -> None:
    with pytest.raises(DistillError, match=r"--k \[16\] out of range"):
        evaluate.PassConfig(n=8, ks=(1, 16))


PROMPTS = [
    Prompt(id=f"p{i}", messages=({"role": "user", "content": f"What is {i} + 7?"},), answer="7")
    for i in range(3)
]


def scripted(tokenizer: PreTrainedTokenizerFast, right_seeds: set[int]):  # noqa: ANN201
    """A generate function: the right answer for seeds in `right_seeds`, a wrong one otherwise;
    prompts ending in the budget sentence get the answer, others think until cut off."""
    sentence = tokenizer.encode(BUDGET_SENTENCE, add_special_tokens=False)
    filler = tokenizer.encode(" step", add_special_tokens=False)[0]

    def generate(prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        out = []
        for p in prompts:
            if list(p[-len(sentence) :]) == sentence or params.max_tokens > 100:
                n = 7 if params.seed in right_seeds or params.seed - 1 in right_seeds else 8
                ids = tokenizer.encode(f"The answer is \\boxed{{{n}}}.<|im_end|>")
                out.append(Generation(token_ids=np.asarray(ids, np.int32), finish_reason="stop"))
            else:
                ids = np.full(params.max_tokens, filler, np.int32)
                out.append(Generation(token_ids=ids, finish_reason="length"))
        return out

    return generate


def test_pass_at_counts_verified_samples(tokenizer: PreTrainedTokenizerFast) -> None:
    config = evaluate.PassConfig(n=3, ks=(1, 2, 3), max_tokens=128, seed=10)
    # sample j uses seed 10 + 2j: only j = 0 is right, so every prompt has c = 1 of n = 3
    out = evaluate.pass_at(scripted(tokenizer, {10}), tokenizer, PROMPTS, config, GpuLedger())
    for mode in ("think", "no_think"):
        assert out[mode]["pass@1"] == pytest.approx(1 / 3)
        assert out[mode]["pass@2"] == pytest.approx(2 / 3)
        assert out[mode]["pass@3"] == 1.0
        assert out[mode]["correct_counts"] == [1, 1, 1]
        assert out[mode]["truncated"] == 0.0


def test_budget_curve_cuts_thinking_at_the_budget(tokenizer: PreTrainedTokenizerFast) -> None:
    config = evaluate.PassConfig(n=2, ks=(1, 2), max_tokens=64, budgets=(16, 4), seed=0)
    curve = evaluate.budget_curve(
        scripted(tokenizer, {0, 2}), tokenizer, PROMPTS, config, GpuLedger()
    )
    sentence = tokenizer.encode(BUDGET_SENTENCE, add_special_tokens=False)
    through_think_end = sentence.index(tokenizer.convert_tokens_to_ids("</think>")) + 1
    assert [r["budget"] for r in curve] == [4, 16]
    for r in curve:  # budget tokens, then the sentence through </think>, then the answer
        assert r["mean_thinking_tokens"] == r["budget"] + through_think_end
        assert r["pass@1"] == 1.0 and r["truncated"] == 0.0


def test_tiny_model_eval_is_deterministic_under_a_seed(tiny_pair: TinyPair) -> None:
    tok = tiny_pair.tokenizer
    sampler = HFSampler(
        tiny_pair.student, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok)
    )
    prompts = evaluate.eval_prompts("embedded", 2, seed=1)

    def run(seed: int) -> tuple[str, list[list[int]]]:
        drawn: list[list[int]] = []

        def generate(ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
            gens = sampler.generate(ids, params)
            drawn.extend(g.token_ids.tolist() for g in gens)
            return gens

        config = evaluate.PassConfig(
            n=2, ks=(1, 2), modes=("think",), max_tokens=5, budgets=(3,), seed=seed
        )
        result = {
            "modes": evaluate.pass_at(generate, tok, prompts, config, GpuLedger()),
            "curve": evaluate.budget_curve(generate, tok, prompts, config, GpuLedger()),
        }
        return json.dumps(result, sort_keys=True), drawn

    first, again, other = run(5), run(5), run(6)
    assert first == again  # same summaries and the very same tokens
    assert first[1] != other[1]
    assert len({tuple(t) for t in first[1]}) > len(first[1]) // 2  # samples j differ from j'


def test_eval_prompts_need_an_answer_column(tmp_path: Path) -> None:
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "What is 2 + 2?"}\n')
    with pytest.raises(DistillError, match="no answers in column 'answer'"):
        evaluate.eval_prompts(str(bare), 4, seed=0)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text('{"question": "q", "solution": "12 * 100 = 1200\\n#### 1,200"}\n')
    rows = evaluate.eval_prompts(str(gsm), 4, 0, prompt_column="question", answer_column="solution")
    assert rows[0].answer == "1200"


def test_stored_result_is_reused_or_refused(tmp_path: Path) -> None:
    config = evaluate.PassConfig(n=2, ks=(1, 2))
    header = {"model": "m", "prompts": "embedded", "n_prompts": 3, "config": config}
    assert evaluate.stored_result(tmp_path, "x", header, force=False) is None
    evaluate.save_result(tmp_path, "x", header, {"modes": {}})
    assert evaluate.stored_result(tmp_path, "x", header, force=False) is not None
    other = {**header, "config": evaluate.PassConfig(n=4, ks=(1, 2))}
    with pytest.raises(DistillError, match="another config"):
        evaluate.stored_result(tmp_path, "x", other, force=False)
    assert evaluate.stored_result(tmp_path, "x", other, force=True) is None
