"""Qwen3 presets: configs build on the meta device with the documented shapes and counts."""

from __future__ import annotations

import pytest
from transformers import Qwen3Config

from students.presets import (
    PRESETS,
    StudentError,
    architecture_mismatch,
    count_params,
    find_preset,
    get_preset,
    identify,
    lora_params,
    preset_config,
    step_memory,
)

# docs/facts.md table: layers, heads Q/KV, tied embeddings.
DOCUMENTED = {
    "0.6B": (28, 16, 8, True),
    "1.7B": (28, 16, 8, True),
    "4B": (36, 32, 8, True),
    "8B": (36, 32, 8, False),
    "14B": (40, 40, 8, False),
    "30B-A3B": (48, 32, 4, False),
}


@pytest.mark.parametrize("size", list(DOCUMENTED))
def test_preset_builds_on_meta_with_documented_shape_and_published_counts(size: str) -> None:
    preset = PRESETS[size]
    config = preset_config(preset)
    layers, heads, kv_heads, tied = DOCUMENTED[size]
    assert (config.num_hidden_layers, config.num_attention_heads) == (layers, heads)
    assert (config.num_key_value_heads, config.tie_word_embeddings) == (kv_heads, tied)
    assert config.vocab_size == 151_936 and config.head_dim == 128
    counts = count_params(config)
    # Model cards round to 0.1B (0.01B for 0.44 / 6.95): agree to that rounding.
    assert counts.total / 1e9 == pytest.approx(preset.published_params, abs=0.05)
    assert counts.non_embedding / 1e9 == pytest.approx(preset.published_non_embedding, abs=0.05)
    if preset.published_active is not None:
        assert counts.active / 1e9 == pytest.approx(preset.published_active, abs=0.06)
    else:
        assert counts.active == counts.total
    assert identify(config) is preset


def test_tied_head_counts_once() -> None:
    counts = count_params(preset_config(PRESETS["0.6B"]))
    assert counts.embedding == 151_936 * 1024  # one tensor, shared by input and output


def test_find_preset_accepts_sizes_names_and_hub_ids() -> None:
    assert find_preset("8B") == (PRESETS["8B"], False)
    assert find_preset("Qwen/Qwen3-8B-Base") == (PRESETS["8B"], True)
    assert find_preset("qwen3-30b-a3b") == (PRESETS["30B-A3B"], False)
    assert find_preset("9B") is None
    assert PRESETS["8B"].hub_id == "Qwen/Qwen3-8B"
    assert PRESETS["8B"].base_hub_id == "Qwen/Qwen3-8B-Base"
    with pytest.raises(StudentError, match="unknown Qwen3 size '9B'"):
        get_preset("9B")


def test_architecture_mismatch_names_the_field() -> None:
    config = preset_config(PRESETS["1.7B"])
    assert architecture_mismatch(config, PRESETS["1.7B"]) is None
    diff = architecture_mismatch(config, PRESETS["8B"])
    assert diff == "num_hidden_layers is 28, Qwen3-8B has 36"


def test_step_memory_bytes_per_parameter() -> None:
    counts = count_params(preset_config(PRESETS["8B"]))
    n = counts.total
    assert step_memory(counts, "bf16-mixed", "adamw").total == 16 * n  # ZeRO's 2+2+12
    assert step_memory(counts, "bf16", "adamw").total == 8 * n
    assert step_memory(counts, "fp32", "sgd").total == 8 * n
    assert step_memory(counts, "bf16-mixed", "adamw8bit").optimizer == 6 * n
    lora = step_memory(counts, "bf16-mixed", "adamw", trainable=1000)
    assert lora.weights == 2 * (n + 1000) and lora.gradients == 2000 and lora.optimizer == 12_000


def test_lora_params_closed_form() -> None:
    config = Qwen3Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, num_hidden_layers=3,
    )  # fmt: skip
    # q: 64->64, v: 64->32, down: 96->64; rank 4
    assert lora_params(config, 4, ("q_proj", "v_proj", "down_proj")) == 3 * 4 * (128 + 96 + 160)
    with pytest.raises(StudentError, match="unknown LoRA target"):
        lora_params(config, 4, ("qkv",))
