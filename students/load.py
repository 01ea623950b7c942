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

# Text whose ids must agree: ASCII, digits (Qwen splits them one by one), whitespace runs,
# non-Latin scripts, emoji, code, and the chat/think markers inside running text.
PROBE_TEXTS = (
    "What is 12 + 30? Answer briefly.",
    "  3.14159 * 2 = 6.28318\n\n\n",
    "naïve café – 東京 Привет 🙂",
    "def f(x):\n\treturn x ** 2  # square",
    "<think>\nstep one\n</think>\n\nThe answer is \\boxed{42}.<|im_end|>",
)
PROBE_CHATS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is 12 + 30?"},),
    (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "<think>\nTwo is prime.\n</think>\n\n2"},
        {"role": "user", "content": "Another one? /no_think"},
    ),
)
NAMED_SPECIALS = ("eos_token", "pad_token", "bos_token", "unk_token")


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
            f"cannot read the config of {source!r} ({' '.join(str(e).split())[:200]}): pass a "
            "local model folder, or a hub id whose files are reachable or cached"
        ) from None


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
    rows = int(head.weight.shape[0]) if isinstance(head, torch.nn.Linear) else vocab_size
    if rows < vocab_size:
        raise StudentError(
            f"model {source} has {rows} output rows but its tokenizer {vocab_size} ids: the "
            "weights and tokenizer belong to different models; use a folder whose config "
            "vocab_size covers its tokenizer"
        )


def tokenizer_mismatch(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> str | None:
    """None when the student tokenizes exactly as the teacher, else the first difference found."""
    for attr in NAMED_SPECIALS:
        t, s = getattr(teacher, attr), getattr(student, attr)
        t_id, s_id = getattr(teacher, f"{attr}_id"), getattr(student, f"{attr}_id")
        if (t, t_id) != (s, s_id):
            return f"{attr} is {t!r} (id {t_id}) in the teacher, {s!r} (id {s_id}) in the student"
    t_added = {i: (a.content, a.special) for i, a in teacher.added_tokens_decoder.items()}
    s_added = {i: (a.content, a.special) for i, a in student.added_tokens_decoder.items()}
    for i in sorted(t_added.keys() | s_added.keys()):
        if t_added.get(i) != s_added.get(i):
            return (
                f"added token {i} is {_added(t_added.get(i))} in the teacher, "
                f"{_added(s_added.get(i))} in the student"
            )
    if len(teacher) != len(student):
        return f"the teacher has {len(teacher)} ids, the student {len(student)}"
    t_vocab = {i: tok for tok, i in teacher.get_vocab().items()}
    s_vocab = {i: tok for tok, i in student.get_vocab().items()}
    for i in sorted(t_vocab.keys() | s_vocab.keys()):
        if t_vocab.get(i) != s_vocab.get(i):
            return f"id {i} is {t_vocab.get(i)!r} in the teacher, {s_vocab.get(i)!r} in the student"
    for text in PROBE_TEXTS:
        t_ids = teacher.encode(text, add_special_tokens=False)
        s_ids = student.encode(text, add_special_tokens=False)
        if t_ids != s_ids:
            return f"text {text!r}: {_first_difference(t_ids, s_ids)}"
    for chat in PROBE_CHATS:
        for thinking in (True, False):
            t_ids, s_ids = _render(teacher, chat, thinking), _render(student, chat, thinking)
            if t_ids != s_ids:
                mode = "think" if thinking else "no_think"
                return (
                    f"chat template, mode {mode}, {len(chat)}-message conversation: "
                    f"{_first_difference(t_ids, s_ids, teacher)}"
                )
    return None


def check_tokenizer(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Raise StudentError naming the first difference between the two tokenizers."""
    diff = tokenizer_mismatch(teacher, student)
    if diff is not None:
        raise StudentError(
            f"the student's tokenizer differs from the teacher's: {diff}; distil only into a "
            "student with the teacher's tokenizer and chat template (every Qwen3 size shares one)"
        )


def _added(entry: tuple[str, bool] | None) -> str:
    return "absent" if entry is None else f"{entry[0]!r} (special={entry[1]})"


def _render(
    tokenizer: PreTrainedTokenizerBase, chat: tuple[dict[str, str], ...], thinking: bool
) -> list[int]:
    if tokenizer.chat_template is None:
        return []  # compared as "renders nothing": the other side's ids name the difference
    text = tokenizer.apply_chat_template(
        [dict(m) for m in chat], tokenize=False, add_generation_prompt=True,
        enable_thinking=thinking,
    )  # fmt: skip
    assert isinstance(text, str)
    return tokenizer.encode(text, add_special_tokens=False)


def _first_difference(
    a: list[int], b: list[int], tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    at = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    shown = f"teacher {a[at : at + 5]} vs student {b[at : at + 5]}"
    if tokenizer is not None and a:
        shown += f" after {tokenizer.decode(a[max(0, at - 6) : at])!r}"
    return f"first difference at token {at}: {shown} ({len(a)} vs {len(b)} tokens)"
