"""Resolving --student, the architecture check, and the teacher/student tokenizer check
(`distill.parity.tokenizer_mismatch`, the one check every command runs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import TinyPair
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from distill.errors import DistillError
from distill.parity import check_conversations, tokenizer_mismatch
from students.load import build_tiny, check_architecture, load_student, resolve_student
from students.presets import PRESETS, StudentError, preset_config


def test_resolve_sizes_hub_ids_and_folders(tiny_pair: TinyPair) -> None:
    assert resolve_student("8B") == "Qwen/Qwen3-8B"
    assert resolve_student("0.6B-Base") == "Qwen/Qwen3-0.6B-Base"
    assert resolve_student("Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert resolve_student("someorg/my-student") == "someorg/my-student"
    assert resolve_student(str(tiny_pair.student_dir)) == str(tiny_pair.student_dir)


@pytest.mark.parametrize("name", ["9B", "qwen3", "./no/such/folder"])
def test_unknown_student_is_a_clear_error(name: str) -> None:
    with pytest.raises(StudentError, match="unknown student"):
        resolve_student(name)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudentError, match="has no config.json"):
        resolve_student(str(tmp_path))


def test_architecture_mismatch_is_refused_before_weights(tmp_path: Path) -> None:
    preset_config(PRESETS["1.7B"]).save_pretrained(tmp_path)  # config only: no weights needed
    check_architecture(str(tmp_path), "1.7B")
    with pytest.raises(StudentError, match="not a Qwen3-8B: num_hidden_layers is 28"):
        check_architecture(str(tmp_path), "8B")
    with pytest.raises(StudentError, match="not a Qwen3-4B"):
        load_student(str(tmp_path), size="4B")


def test_tiny_preset_builds_on_the_teacher_tokenizer(tiny_pair: TinyPair, tmp_path: Path) -> None:
    path = resolve_student(
        "tiny-student", tokenizer_from=str(tiny_pair.teacher_dir), cache=tmp_path
    )
    assert build_tiny("tiny-student", str(tiny_pair.teacher_dir), tmp_path) == Path(path)
    model, tok = load_student(path)
    assert model.config.num_hidden_layers == 2
    check_conversations(tiny_pair.tokenizer, tok)
    with pytest.raises(StudentError, match="takes its tokenizer from the teacher"):
        resolve_student("tiny-student")


def test_same_tokenizer_passes(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer_mismatch(tokenizer, copy.deepcopy(tokenizer)) is None


def test_other_vocabulary_is_caught(tokenizer: PreTrainedTokenizerFast) -> None:
    # Same specials and size, but two ordinary tokens swap ids: only the vocabulary differs.
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=tokenizer.chat_template,
    )
    low = min(vocab["a"], vocab["b"])
    diff = tokenizer_mismatch(tokenizer, other)
    assert diff is not None and f"first: {low}: " in diff
    with pytest.raises(DistillError, match="teacher and student tokenizers differ"):
        check_conversations(tokenizer, other)


def test_extra_added_token_is_caught(tokenizer: PreTrainedTokenizerFast) -> None:
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<tool_call>"])
    diff = tokenizer_mismatch(tokenizer, other)
    assert diff is not None and f"{len(tokenizer)}: None vs '<tool_call>'" in diff


def test_other_special_token_is_caught(tokenizer: PreTrainedTokenizerFast) -> None:
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"
    diff = tokenizer_mismatch(tokenizer, other)
    assert diff is not None and diff.startswith("tokenizers differ: eos_token is '<|im_end|>'")


def test_chat_template_difference_names_mode_and_token(tokenizer: PreTrainedTokenizerFast) -> None:
    other = copy.deepcopy(tokenizer)
    # A template that ignores enable_thinking: same ids everywhere except the no_think prompt.
    assert isinstance(other.chat_template, str)
    other.chat_template = other.chat_template.replace("enable_thinking is false", "false")
    diff = tokenizer_mismatch(tokenizer, other)
    # it no longer switches modes: the format detection (teachers.chat) names that first
    assert (
        diff
        == "templates render differently: the templates' thinking formats differ: switch vs none"
    )
