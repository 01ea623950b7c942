"""Kept teacher rows as training examples, and the identity of that data for resume.

`think_block="target"` moves a hard-switch no_think row's empty think block from the prompt into
the trained response and renders the prompt with the `/no_think` soft switch instead, so the
student learns to write the block itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from distill.batch import Example
from distill.errors import DistillError
from distill.teacher_data import read_rows
from teachers.chat import render_prompt
from teachers.protocol import TopK


def load_examples(
    data_dir: Path,
    with_topk: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
    think_block: str = "prompt",
) -> list[Example]:
    """The kept rows as training examples; `think_block="target"` needs the tokenizer."""
    rows = read_rows(data_dir)
    kept = [r for r in rows if r["verdict"] == "kept"]
    if not kept:
        by: dict[str, int] = {}
        for r in rows:
            by[str(r["verdict"])] = by.get(str(r["verdict"]), 0) + 1
        raise DistillError(
            f"no usable teacher responses in {data_dir}: all {len(rows)} were filtered out "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(by.items()))}); raise --max-tokens, "
            "use a stronger teacher, or relax the filters"
        )
    if with_topk and "topk_ids" not in kept[0]:
        raise DistillError(
            "--kd-weight > 0 needs the teacher's top-k in the data: regenerate with --store-topk K"
        )
    examples = []
    for r in kept:
        prompt = list(r["prompt_ids"])  # type: ignore[arg-type]
        response = list(r["response_ids"])  # type: ignore[arg-type]
        train = ~np.asarray(r["forced"], dtype=bool)  # (R,) forced tokens are context
        topk = None
        if with_topk:
            ids = np.asarray(r["topk_ids"], dtype=np.int32)  # (R, K)
            lp = np.asarray(r["topk_logprobs"], dtype=np.float32)  # (R, K)
            topk = TopK(ids=ids, logprobs=lp, actual_logprobs=np.zeros(len(response), np.float32))
        if think_block == "target" and r["mode"] == "no_think":
            assert tokenizer is not None, "think_block='target' re-renders prompts: pass tokenizer"
            prompt, block = _soft_switch(r, prompt, tokenizer)
            response = block + response
            train = np.concatenate([np.ones(len(block), bool), train])
            if topk is not None:  # the teacher never scored the block: no KD rows there (-1)
                K = topk.k
                topk = TopK(
                    ids=np.concatenate([np.full((len(block), K), -1, np.int32), topk.ids]),
                    logprobs=np.concatenate(
                        [np.full((len(block), K), -np.inf, np.float32), topk.logprobs]
                    ),
                    actual_logprobs=np.zeros(len(response), np.float32),
                )
        examples.append(Example(prompt_ids=prompt, response_ids=response, train=train, topk=topk))
    return examples


def _soft_switch(
    row: dict[str, object], prompt: list[int], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """(prompt with /no_think, the empty think block) from a hard-switch no_think prompt."""
    think_start = tokenizer.convert_tokens_to_ids("<think>")
    if think_start not in prompt[-8:]:
        return prompt, []  # soft-switch data: the block is in the response already
    cut = len(prompt) - prompt[::-1].index(think_start) - 1
    messages = list(row["messages"])  # type: ignore[call-overload]
    soft = render_prompt(tokenizer, messages, "no_think", soft_switch=True)
    return soft, prompt[cut:]


def fingerprint(data_dir: Path) -> str:
    """Identity of the training data: a resumed run must read the same kept rows."""
    keys = [
        str(r["key"]) for r in read_rows(data_dir, ["key", "verdict"]) if r["verdict"] == "kept"
    ]
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
