"""Tiny Qwen3-shaped models and a locally trained Qwen3-style tokenizer: no hub, fully seeded.

They stand in for the real Qwen3 family in tests and on CPU. The shapes keep what matters:
head_dim 64 (the smallest vLLM's CPU attention accepts), grouped-query attention, and a head
wider than the tokenizer (Qwen3: 151,669 ids, 151,936 rows), so vocabulary hygiene is exercised.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# Qwen3's special tokens, in Qwen3's order (ids differ: ours follow the BPE merges).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")  # added, but not "special": they survive skip_special_tokens

# Qwen2/3's pre-tokenisation split: single digits, letters runs, punctuation runs, newlines.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen3 chat template's behaviour, written for this project: `enable_thinking=False` puts an
# empty think block in the prompt; reasoning of assistant turns before the last user query is
# dropped; the last turns keep `<think>\n...\n</think>\n\n` before the answer.
QWEN3_CHAT_TEMPLATE = """\
{%- set ns = namespace(last_query=messages|length - 1) -%}
{%- for m in messages[::-1] -%}
{%- if m.role == 'user' and ns.last_query == messages|length - 1 -%}
{%- set ns.last_query = messages|length - 1 - loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content -%}
{%- set reasoning = '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query -%}
{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content -}}
{%- else -%}
{{- '<|im_start|>assistant\n' + content -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}
"""


@dataclass(frozen=True, kw_only=True)
class TinyShape:
    """Architecture of a tiny Qwen3. `vocab_rows` > tokenizer size leaves padded rows, as Qwen3."""

    layers: int
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    vocab_rows: int = 512
    max_positions: int = 1024


TINY_SHAPES: dict[str, TinyShape] = {
    "tiny-student": TinyShape(layers=2),
    "tiny-teacher": TinyShape(layers=4),
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with Qwen3's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int), (token, found)
    return found


def tiny_qwen3_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    assert shape.vocab_rows >= len(tokenizer), (shape.vocab_rows, len(tokenizer))
    return Qwen3Config(
        vocab_size=shape.vocab_rows,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=token_id(tokenizer, "<|im_end|>"),
        pad_token_id=token_id(tokenizer, "<|endoftext|>"),
    )


def tiny_qwen3(shape: TinyShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised tiny Qwen3; the same seed gives the same weights."""
    config = tiny_qwen3_config(shape, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.float().eval()


def save_pretrained(
    model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path
) -> None:
    """Write a `from_pretrained`-loadable folder (safetensors weights, config, tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
