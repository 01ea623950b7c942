"""Chat rendering, thinking modes and the thinking budget, above every backend.

Everything is rendered to token ids once, here, and those ids are what the teacher generates from,
what it scores, and what the student trains on: re-tokenising text between them drifts and
silently biases the KL. Qwen3's two switches:
- hard: the template's `enable_thinking=False` appends an empty `<think>\\n\\n</think>\\n\\n` to the
  prompt, so the model starts directly with the answer;
- soft: `/think` or `/no_think` at the end of a user message; the model itself emits the (empty)
  think block. The latest switch in a conversation wins.

Other families are handled by what their template does, found once by rendering probes
(`detect_format`), never by model name:
- switch: Qwen3's two switches above; modes think and no_think;
- always: the template (or the model, as the template's history handling shows) always opens a
  think block (DeepSeek-R1 distills, QwQ); mode think only;
- none: no thinking at all (Qwen2.5, Llama 3, Gemma 3, SmolLM2, Mistral); mode plain only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from students.sample import Generation, SamplingParams
from teachers.protocol import TeacherError

Mode = Literal["think", "no_think", "plain"]
MODES: tuple[Mode, ...] = ("think", "no_think")  # Qwen3's two modes: the default on *switch*
ALL_MODES: tuple[Mode, ...] = ("think", "no_think", "plain")  # iterate these when grouping rows
ChatFormat = Literal["switch", "always", "none"]
FORMAT_MODES: dict[ChatFormat, tuple[Mode, ...]] = {
    "switch": MODES,
    "always": ("think",),
    "none": ("plain",),
}
MODE_CHOICES = ("auto", "think", "no_think", "both", "plain")
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
    """Token ids of a conversation ending in the assistant generation prompt, in `mode`.

    `plain` renders the template as it is (no thinking switch passed): the mode of a *none*
    template. Which modes a template supports is `detect_format`'s business, checked up front.
    """
    msgs = [dict(m) for m in messages]
    if mode == "plain":
        if soft_switch:
            raise TeacherError("--soft-switch needs a template with thinking modes, not plain")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)
        return tokenizer.encode(text, add_special_tokens=False)
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


_PROBE: list[Message] = [{"role": "user", "content": "1+1"}]
_REASON, _ANSWER = "probe-reasoning-7", "probe-answer-7"


def _text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    generation: bool = True,
    thinking: bool | None = None,
) -> str:
    msgs = [dict(m) for m in messages]
    if thinking is None:  # the template as it is: no switch passed
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    else:
        text = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation, enable_thinking=thinking
        )
    assert isinstance(text, str)
    return text


def detect_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The template's thinking behaviour, found by rendering three probes (never by model name).

    - switch: `enable_thinking=False` closes an empty think block in the prompt (Qwen3);
    - always: the generation prompt opens a think block, or the template strips `<think>...`
      reasoning from earlier assistant turns (the model writes the block itself: R1 distills, QwQ);
    - none: neither (ChatML, Llama 3, Gemma, Mistral templates).
    """
    if tokenizer.chat_template is None:
        raise TeacherError(
            f"{tokenizer.name_or_path or 'the tokenizer'} has no chat template: distill renders "
            "every prompt with it; use an instruct/chat model's tokenizer"
        )
    on = _text(tokenizer, _PROBE, thinking=True)
    off = _text(tokenizer, _PROBE, thinking=False)
    if on != off and "</think>" in off[-32:]:
        return "switch"
    base = _text(tokenizer, _PROBE, generation=False)
    suffix = on[len(base) :] if on.startswith(base) else on[-32:]
    if "<think>" in suffix:
        return "always"
    history = [
        *_PROBE,
        {"role": "assistant", "content": f"<think>\n{_REASON}\n</think>\n\n{_ANSWER}"},
        {"role": "user", "content": "2+2"},
    ]
    rendered = _text(tokenizer, history)
    if _ANSWER in rendered and _REASON not in rendered:
        return "always"
    return "none"


def modes_for(requested: str, fmt: ChatFormat) -> tuple[Mode, ...]:
    """What `--modes requested` means: auto is both modes on switch, think on always, plain on
    none; the others are themselves (checked by `check_modes`)."""
    named: dict[str, tuple[Mode, ...]] = {
        "auto": FORMAT_MODES[fmt],
        "both": MODES,
        "think": ("think",),
        "no_think": ("no_think",),
        "plain": ("plain",),
    }
    if requested not in named:
        raise TeacherError(f"--modes {requested!r} is not one of {', '.join(MODE_CHOICES)}")
    return named[requested]


_WHAT: dict[ChatFormat, str] = {
    "switch": "a thinking switch (modes think, no_think)",
    "always": "an always-open think block (mode think only)",
    "none": "no thinking switch and no think block (mode plain only)",
}


def check_modes(
    modes: Sequence[Mode],
    tokenizer: PreTrainedTokenizerBase,
    *,
    soft_switch: bool = False,
    thinking_budget: bool = False,
) -> ChatFormat:
    """Refuse modes, `--soft-switch` or a thinking budget the template cannot honour, up front;
    return its format. `thinking_budget` says whether a budget was asked for."""
    fmt = detect_format(tokenizer)
    supported = FORMAT_MODES[fmt]
    if not modes or any(m not in supported for m in modes):
        raise TeacherError(
            f"--modes {','.join(modes) or '(none)'}: the chat template has {_WHAT[fmt]} (format "
            f"{fmt}): pass --modes auto or {' / '.join(supported)}"
        )
    if soft_switch and fmt != "switch":
        raise TeacherError(
            f"--soft-switch writes /think, /no_think into the user turn, but the chat template "
            f"has {_WHAT[fmt]}: drop --soft-switch"
        )
    if thinking_budget and (fmt == "none" or think_end_token(tokenizer) is None):
        raise TeacherError(
            f"--thinking-budget needs think tokens, but the chat template has {_WHAT[fmt]}"
            f"{'' if fmt == 'none' else ' and </think> is not one token'}: drop --thinking-budget"
        )
    return fmt


def think_end_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of `</think>` when it is one token of the vocabulary, else None."""
    ids = tokenizer.encode("</think>", add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


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
    """None when both tokenizers render `messages` to the same ids in every mode of `a`'s format
    (system prompts the templates inject included), else the first differing token, shown."""
    fmt_a, fmt_b = detect_format(a), detect_format(b)
    if fmt_a != fmt_b:
        return f"the templates' thinking formats differ: {fmt_a} vs {fmt_b}"
    for mode in FORMAT_MODES[fmt_a]:
        ids_a = render_prompt(a, messages, mode)
        ids_b = render_prompt(b, messages, mode)
        if ids_a != ids_b:
            at = next(
                (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y),
                min(len(ids_a), len(ids_b)),
            )
            tok_a = a.convert_ids_to_tokens(ids_a[at]) if at < len(ids_a) else "(end)"
            tok_b = b.convert_ids_to_tokens(ids_b[at]) if at < len(ids_b) else "(end)"
            return (
                f"mode {mode}: first difference at token {at}: {tok_a!r} vs {tok_b!r}, ids "
                f"{ids_a[at : at + 5]} vs {ids_b[at : at + 5]} after "
                f"{a.decode(ids_a[max(0, at - 8) : at])!r} "
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
