"""Resolve `--student` to a loadable model, and check its tokenizer against the teacher's.

`--student` may be a Qwen3 size ('8B', '8B-Base', 'Qwen3-30B-A3B'), a hub id ('Qwen/Qwen3-8B'),
a local folder written by save_pretrained, or a tiny preset ('tiny-student') that is built on
the teacher's tokenizer. Before any training the student's tokenizer must agree with the
teacher's on ids, special tokens and chat-template output in both modes: a student that reads
the same text as other ids makes every per-token KL compare unrelated distributions.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from students.presets import PRESETS, StudentError, architecture_mismatch, find_preset
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3


def resolve_student(
    name: str, *, tokenizer_from: str | None = None, cache: Path | None = None
) -> str:
    """A path or hub id that `from_pretrained` loads, for a `--student` value.

    Local folder -> itself; Qwen3 size -> its hub id ('8B' -> 'Qwen/Qwen3-8B', '8B-Base' ->
    'Qwen/Qwen3-8B-Base'); 'org/name' -> itself; tiny preset -> a seeded random tiny Qwen3 on the
    tokenizer of `tokenizer_from` (the teacher), written once under `cache`.
    """
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise StudentError(
                f"student folder {name} has no config.json: pass a folder written by "
                "save_pretrained (config.json + safetensors + tokenizer)"
            )
        return str(path)
    found = find_preset(name)
    if found is not None:
        preset, base = found
        return preset.base_hub_id if base else preset.hub_id
    if name in TINY_SHAPES:
        if tokenizer_from is None or cache is None:
            raise StudentError(
                f"tiny preset {name!r} takes its tokenizer from the teacher: pass a teacher "
                "folder (tokenizer_from) and a cache folder"
            )
        return str(build_tiny(name, tokenizer_from, cache))
    if name.count("/") == 1 and not name.startswith((".", "/")) and not path.exists():
        return name  # a hub id; loading reads it from the local hub cache
    raise StudentError(
        f"unknown student {name!r}: pass a Qwen3 size ({', '.join(PRESETS)}, optionally -Base), "
        f"a hub id like Qwen/Qwen3-8B, a local model folder, or a tiny preset "
        f"({', '.join(TINY_SHAPES)})"
    )


def build_tiny(name: str, tokenizer_from: str, cache: Path, seed: int = 0) -> Path:
    """A seeded random tiny Qwen3 sharing `tokenizer_from`'s tokenizer (built once, cached)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()[:10]
    out = cache / "tiny" / f"{name}-{digest}-seed{seed}"
    if (out / "config.json").exists():
        return out
    # The head must cover every id; round up to 64 rows, leaving padded rows as Qwen3 does.
    rows = max(TINY_SHAPES[name].vocab_rows, -(-len(tokenizer) // 64) * 64)
    shape = replace(TINY_SHAPES[name], vocab_rows=rows)
    save_pretrained(tiny_qwen3(shape, tokenizer, seed=seed), tokenizer, out)
    return out


def load_config(source: str) -> PretrainedConfig:
    """config.json of a model folder or hub id, or a StudentError naming it and the fix."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:  # not found, not reachable, not a model config
        raise StudentError(
            f"cannot read the config of {source!r} ({first_sentences(str(e))}): pass a "
            "local model folder, or a hub id whose files are reachable or cached"
        ) from None


def first_sentences(text: str, limit: int = 200) -> str:
    """A library's error message on one line, cut at the last sentence end within `limit`
    characters (or at the limit, marked "...") so that ours never ends mid-word or mid-address."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > 0 else text[:limit] + "..."


def check_architecture(source: str, size: str) -> None:
    """Refuse a model whose config.json does not have the architecture of Qwen3-`size`."""
    found = find_preset(size)
    if found is None:
        raise StudentError(f"unknown Qwen3 size {size!r}: choose one of {', '.join(PRESETS)}")
    config = load_config(source)
    diff = architecture_mismatch(config, found[0])
    if diff is not None:
        raise StudentError(
            f"student {source} is not a Qwen3-{found[0].size}: {diff}; pass the folder of that "
            "size, or name the size it really is"
        )


def load_student(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    size: str | None = None,
    tokenizer_from: str | None = None,
    cache: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a `--student` value; a named size is checked before weights load."""
    source = resolve_student(name, tokenizer_from=tokenizer_from, cache=cache)
    found = find_preset(name)
    expected = size if size is not None else (found[0].size if found else None)
    try:
        if expected is not None:
            check_architecture(source, expected)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:  # not in the hub cache and no network, or unreadable files
        raise StudentError(
            f"cannot load student {source} ({str(e).splitlines()[0][:160]}): download it first "
            f"(`hf download {source}`) where the hub is reachable, or pass a local folder"
        ) from None
    return model, tokenizer


def check_head(model: PreTrainedModel, vocab_size: int, source: str) -> None:
    """A head narrower than the tokenizer cannot score every id: another tokenizer's model."""
    head = model.get_output_embeddings()
    # ZeRO-3 partitions weights as they load: the local tensor is empty, ds_shape the real one
    rows = vocab_size
    if isinstance(head, torch.nn.Linear):
        rows = int(getattr(head.weight, "ds_shape", head.weight.shape)[0])
    if rows < vocab_size:
        raise StudentError(
            f"model {source} has {rows} output rows but its tokenizer {vocab_size} ids: the "
            "weights and tokenizer belong to different models; use a folder whose config "
            "vocab_size covers its tokenizer"
        )
