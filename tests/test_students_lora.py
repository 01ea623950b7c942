"""LoRA students: only adapters train, merged export equals the wrapped model, resume is exact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3ForCausalLM

from students import lora
from students.presets import StudentError, lora_params
from students.tiny import TINY_SHAPES, tiny_qwen3, tiny_qwen3_config

pytest.importorskip("peft")


def _student(tokenizer: PreTrainedTokenizerFast, tied: bool) -> Qwen3ForCausalLM:
    if not tied:
        return tiny_qwen3(TINY_SHAPES["tiny-student"], tokenizer, seed=2)
    config = tiny_qwen3_config(TINY_SHAPES["tiny-student"], tokenizer)
    config.tie_word_embeddings = True  # as Qwen3 0.6B-4B: one tensor for input and output
    torch.manual_seed(2)
    return Qwen3ForCausalLM(config).float().eval()


def _train_one_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    logits = model(input_ids=ids).logits  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()


@pytest.mark.parametrize("tied", [False, True])
def test_lora_trains_adapters_and_exports_merged(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, tied: bool
) -> None:
    base = _student(tokenizer, tied)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    before = base(input_ids=ids).logits.detach()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = lora.wrap(base, lora.Config(rank=4))
    assert lora.trainable_params(model) == lora_params(base.config, 4, lora.QWEN3_LINEARS)
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0 at start
    _train_one_step(model, ids)
    after = model(input_ids=ids).logits.detach()
    assert (after - before).abs().max() > 1e-3
    for k, v in model.get_base_model().state_dict().items():  # the base stayed frozen
        if ".lora_" not in k:
            torch.testing.assert_close(v, frozen[k.replace(".base_layer.", ".")])
    lora.save_merged(model, tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids).logits, after, atol=1e-5, rtol=1e-5)


def test_adapter_state_resumes_exactly(tokenizer: PreTrainedTokenizerFast) -> None:
    config = lora.Config(rank=2, targets=("q_proj", "v_proj"))
    model = lora.wrap(_student(tokenizer, False), config)
    ids = torch.arange(10)[None] + 3
    _train_one_step(model, ids)
    saved = {k: v.clone() for k, v in lora.adapter_state(model).items()}
    fresh = lora.wrap(_student(tokenizer, False), replace(config, seed=7))
    lora.load_adapter_state(fresh, saved)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_lora_settings_are_clear(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(StudentError, match="--lora-rank must be a positive integer"):
        lora.Config(rank=0)
    with pytest.raises(StudentError, match=r"LoRA targets \['qkv'\] are not modules"):
        lora.wrap(_student(tokenizer, False), lora.Config(rank=2, targets=("qkv",)))
