"""Chat rendering, thinking modes and the thinking budget, above every backend.

Everything is rendered to token ids once, here, and those ids are what the teacher generates from,
what it scores, and what the student trains on: re-tokenising text between them drifts and
silently biases the KL. Qwen3's two switches:
- hard: the template's `enable_thinking=False` appends an empty `<think>\\n\\n</think>\\n\\n` to the
  prompt, so the model starts directly with the answer;
- soft: `/think` or `/no_think` at the end of a user message; the model itself emits the (empty)
  think block. The latest switch in a conversation wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from teachers.protocol import Generation, SamplingParams, TeacherError

Mode = Literal["think", "no_think"]
MODES: tuple[Mode, ...] = ("think", "no_think")
Message = dict[str, str]
GenerateFn = Callable[[Sequence[Sequence[int]], SamplingParams], list[Generation]]

# Qwen's own code inserts this sentence (preceded by a blank line) when the budget runs out; the
# report's §4.3 prints it with "</think>." — configurable, this is the default.
BUDGET_SENTENCE = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the "
    "thinking directly now.\n</think>\n\n"
)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    mode: Mode,
    soft_switch: bool = False,
) -> list[int]:
    """Token ids of a conversation ending in the assistant generation prompt, in `mode`."""
    msgs = [dict(m) for m in messages]
    if soft_switch:
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last_user]["content"] += " /think" if mode == "think" else " /no_think"
    text = tokenizer.apply_chat_template(
        msgs,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=(mode == "think") or soft_switch,
    )
    assert isinstance(text, str)
    if mode == "no_think" and not soft_switch and "</think>" not in text[-32:]:
        raise TeacherError(
            "the chat template ignores enable_thinking=False (no empty <think></think> block in "
            "the prompt): use a Qwen3 tokenizer/template, or pass soft_switch=True for /no_think"
        )
    return tokenizer.encode(text, add_special_tokens=False)


def check_thinking_switch(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a chat template on which `enable_thinking` changes nothing: modes are meaningless.

    Asking such a model for thinking (or non-thinking) mode would silently give the same prompt
    for both, and the dataset's mode column would lie.
    """
    probe = [{"role": "user", "content": "1+1"}]
    on, off = (
        tokenizer.apply_chat_template(
            probe, tokenize=False, add_generation_prompt=True, enable_thinking=flag
        )
        for flag in (True, False)
    )
    if on == off:
        raise TeacherError(
            "the chat template has no thinking switch (enable_thinking changes nothing), so "
            "think and no_think modes cannot be asked for: use a Qwen3 tokenizer/template"
        )


def split_thinking(token_ids: Sequence[int], think_end_id: int) -> tuple[list[int], list[int]]:
    """(thinking, answer) split after the first `</think>`; no `</think>` means all thinking."""
    ids = list(token_ids)
    if think_end_id not in ids:
        return ids, []
    cut = ids.index(think_end_id) + 1
    return ids[:cut], ids[cut:]


def generate_with_budget(
    generate: GenerateFn,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    budget: int,
    think_end_id: int,
    sentence_ids: Sequence[int],
) -> list[Generation]:
    """Qwen's two-phase thinking budget over any generate function (teacher or student).

    Phase 1 generates up to `budget` tokens. Where neither `</think>` nor eos came, the stop
    sentence (ending in `</think>`) is appended, marked forced, and phase 2 continues to the answer
    within what remains of `params.max_tokens`. Where `</think>` did come, phase 2 just continues.
    """
    assert budget >= 1 and think_end_id in sentence_ids, "the sentence must close the think block"
    first = generate(prompts, replace(params, max_tokens=min(budget, params.max_tokens)))
    todo = [
        i
        for i, g in enumerate(first)
        if g.finish_reason == "length" and len(g.token_ids) < params.max_tokens
    ]
    if not todo:
        return first
    sentence = np.asarray(sentence_ids, dtype=np.int32)
    inserts = [
        np.zeros(0, np.int32) if think_end_id in first[i].token_ids else sentence for i in todo
    ]
    rest = [
        max(1, params.max_tokens - len(first[i].token_ids) - len(ins))
        for i, ins in zip(todo, inserts, strict=True)
    ]
    # One call per distinct remaining length keeps each continuation within its own limit.
    out = list(first)
    for max_tokens in sorted(set(rest)):
        group = [j for j, r in enumerate(rest) if r == max_tokens]
        cont_prompts = [
            [*prompts[todo[j]], *first[todo[j]].token_ids.tolist(), *inserts[j].tolist()]
            for j in group
        ]
        cont_params = replace(params, max_tokens=max_tokens, seed=params.seed + 1)
        second = generate(cont_prompts, cont_params)
        for j, g in zip(group, second, strict=True):
            i, ins = todo[j], inserts[j]
            ids = np.concatenate([first[i].token_ids, ins, g.token_ids]).astype(np.int32)
            forced = np.concatenate(
                [
                    np.zeros(len(first[i].token_ids), bool),
                    np.ones(len(ins), bool),
                    np.zeros(len(g.token_ids), bool),
                ]
            )
            out[i] = Generation(token_ids=ids, finish_reason=g.finish_reason, forced=forced)
    return out


def template_mismatch(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, messages: Sequence[Message]
) -> str | None:
    """None when both tokenizers render `messages` to the same ids in both modes, else the diff."""
    for mode in MODES:
        ids_a = render_prompt(a, messages, mode)
        ids_b = render_prompt(b, messages, mode)
        if ids_a != ids_b:
            at = next(
                (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y),
                min(len(ids_a), len(ids_b)),
            )
            return (
                f"mode {mode}: first difference at token {at}: "
                f"{ids_a[at : at + 5]} vs {ids_b[at : at + 5]} "
                f"({len(ids_a)} vs {len(ids_b)} tokens)"
            )
    return None


def vocab_mismatch(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, show: int = 5
) -> str | None:
    """None when both tokenizers map every id to the same token, else which ids differ."""
    va = {i: t for t, i in a.get_vocab().items()}
    vb = {i: t for t, i in b.get_vocab().items()}
    differ = sorted(i for i in va.keys() | vb.keys() if va.get(i) != vb.get(i))
    if not differ:
        return None
    shown = ", ".join(f"{i}: {va.get(i)!r} vs {vb.get(i)!r}" for i in differ[:show])
    return f"{len(differ)} ids differ ({len(va)} vs {len(vb)} ids), first: {shown}"
