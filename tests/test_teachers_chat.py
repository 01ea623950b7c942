"""Chat rendering, the two thinking switches, the </think> split and the two-phase budget."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from students.sample import Generation, SamplingParams
from teachers.chat import (
    BUDGET_SENTENCE,
    generate_with_budget,
    render_prompt,
    template_mismatch,
    vocab_mismatch,
)
from teachers.protocol import TeacherError

MSGS = [{"role": "user", "content": "Ana has 3 apples. How many?"}]


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(i, int), i
    return i


def test_modes_render_as_the_qwen3_template(tokenizer: PreTrainedTokenizerFast) -> None:
    think = str(tokenizer.decode(render_prompt(tokenizer, MSGS, "think")))
    no_think = str(tokenizer.decode(render_prompt(tokenizer, MSGS, "no_think")))
    head = "<|im_start|>user\nAna has 3 apples. How many?<|im_end|>\n<|im_start|>assistant\n"
    assert think == head
    assert no_think == head + "<think>\n\n</think>\n\n"  # hard switch: empty block in the prompt


def test_soft_switch_appends_to_the_last_user_message(tokenizer: PreTrainedTokenizerFast) -> None:
    convo = [*MSGS, {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 4?"}]
    text = str(tokenizer.decode(render_prompt(tokenizer, convo, "no_think", soft_switch=True)))
    assert text.endswith("And 4? /no_think<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("/no_think") == 1  # the model emits the empty block itself


class ScriptedGenerate:
    """A generate function returning fixed continuations; records every call."""

    def __init__(self, script: list[list[int]], eos: int) -> None:
        self.script, self.eos = script, eos
        self.calls: list[tuple[list[list[int]], int]] = []

    def __call__(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        self.calls.append(([list(p) for p in prompts], params.max_tokens))
        out = []
        for p in prompts:
            ids = self.script[len(self.calls) - 1][: params.max_tokens]
            stop = bool(ids) and ids[-1] == self.eos
            out.append(
                Generation(
                    token_ids=np.asarray(ids, np.int32), finish_reason="stop" if stop else "length"
                )
            )
            del p
        return out


@pytest.mark.parametrize("budget", [3, 5])
def test_budget_inserts_the_sentence_once_and_masks_it(
    tokenizer: PreTrainedTokenizerFast, budget: int
) -> None:
    end, eos = token_id(tokenizer, "</think>"), token_id(tokenizer, "<|im_end|>")
    sentence = tokenizer.encode(BUDGET_SENTENCE, add_special_tokens=False)
    gen = ScriptedGenerate([[10] * 50, [20, 21, eos]], eos)
    params = SamplingParams(temperature=0.6, max_tokens=40)
    (g,) = generate_with_budget(
        gen, [[1, 2]], params, budget=budget, think_end_id=end, sentence_ids=sentence
    )
    ids = g.token_ids.tolist()
    assert ids == [10] * budget + sentence + [20, 21, eos]
    assert g.forced.tolist() == [False] * budget + [True] * len(sentence) + [False] * 3
    assert ids.count(end) == 1 and g.finish_reason == "stop"
    # Phase 2 continues from prompt + thinking + sentence, within what is left of max_tokens.
    assert gen.calls[1] == ([[1, 2, *[10] * budget, *sentence]], 40 - budget - len(sentence))


def test_budget_inserts_nothing_when_thinking_ended(tokenizer: PreTrainedTokenizerFast) -> None:
    end, eos = token_id(tokenizer, "</think>"), token_id(tokenizer, "<|im_end|>")
    sentence = tokenizer.encode(BUDGET_SENTENCE, add_special_tokens=False)
    params = SamplingParams(temperature=0.6, max_tokens=40)
    for script in ([[10, end, 11, eos]], [[10, 11, eos]]):  # closed in budget; eos in budget
        gen = ScriptedGenerate(script, eos)
        (g,) = generate_with_budget(
            gen, [[1]], params, budget=8, think_end_id=end, sentence_ids=sentence
        )
        assert not g.forced.any() and len(gen.calls) == 1
    gen = ScriptedGenerate([[10, end, 11, 12], [13, eos]], eos)  # closed, answer cut at budget
    (g,) = generate_with_budget(
        gen, [[1]], params, budget=4, think_end_id=end, sentence_ids=sentence
    )
    assert g.token_ids.tolist() == [10, end, 11, 12, 13, eos] and not g.forced.any()


def test_template_and_vocab_parity(tokenizer: PreTrainedTokenizerFast) -> None:
    assert template_mismatch(tokenizer, tokenizer, MSGS) is None
    assert vocab_mismatch(tokenizer, tokenizer) is None
    template = tokenizer.chat_template
    assert isinstance(template, str)
    drifted = template.replace(
        "{%- if add_generation_prompt -%}", "{%- if add_generation_prompt -%}{{- ' ' -}}"
    )
    other = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=drifted,
    )
    diff = template_mismatch(tokenizer, other, MSGS)
    assert diff is not None and "first difference at token" in diff


def test_no_think_refuses_a_template_without_the_switch(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token="<|im_end|>",
        chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    with pytest.raises(TeacherError, match="enable_thinking"):
        render_prompt(plain, MSGS, "no_think")
