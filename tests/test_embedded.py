"""The embedded teacher/student build: the recipe on a few steps, caching, rebuilds, data rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distill import embedded
from distill.tasks import problems, response_text
from students.tiny import TINY_SHAPES, tiny_qwen3
from teachers.chat import render_prompt

SHORT = embedded.Recipe(steps=12, problems=64, batch_size=16, check_problems=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[embedded.Assets, list[str]]:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_CACHE", str(cache))
        messages: list[str] = []
        return embedded.build(SHORT, log=messages.append), messages


@torch.no_grad()
def reference_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> float:
    """Mean cross-entropy of thinking-mode reference responses on held-out problems."""
    total, count = 0.0, 0
    for p in problems(16, 0, "eval"):
        prompt = render_prompt(tokenizer, [{"role": "user", "content": p.prompt}], "think")
        response = tokenizer.encode(response_text(p, True) + "<|im_end|>", add_special_tokens=False)
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1, : len(tokenizer)]  # (R, V)
        total += float(
            torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum")
        )
        count += len(response)
    return total / count


def test_build_writes_a_trained_teacher_and_an_untrained_student(
    built: tuple[embedded.Assets, list[str]],
) -> None:
    assets, messages = built
    tok = AutoTokenizer.from_pretrained(assets.teacher)
    assert len(tok) == len(AutoTokenizer.from_pretrained(assets.student))
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher)
    student = AutoModelForCausalLM.from_pretrained(assets.student)
    assert teacher.config.num_hidden_layers == TINY_SHAPES["tiny-teacher"].layers
    assert student.config.num_hidden_layers == TINY_SHAPES["tiny-student"].layers
    init = tiny_qwen3(TINY_SHAPES["tiny-teacher"], tok, seed=SHORT.seed + 1)
    assert reference_loss(teacher, tok) < 0.7 * reference_loss(init, tok)
    assert not (assets.teacher / "trainer_state.pt").exists()
    done = json.loads((assets.teacher.parent / "done.json").read_text())
    assert set(done["accuracy"]) == {"think", "no_think"} and done["seconds"] > 0
    assert any("teacher SFT step 12/12" in m for m in messages), messages
    assert any("greedy accuracy on 4 held-out problems" in m for m in messages), messages


def test_a_second_build_reuses_the_cache_and_a_half_built_one_is_redone(
    built: tuple[embedded.Assets, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assets, _ = built
    monkeypatch.setenv("DISTILL_CACHE", str(assets.teacher.parents[2]))
    messages: list[str] = []
    assert embedded.build(SHORT, log=messages.append) == assets
    assert messages == []
    other = embedded.Recipe(steps=1, problems=8, batch_size=8, check_problems=1)
    root = Path(embedded.build(other, log=messages.append).teacher).parent
    assert root != assets.teacher.parent  # another recipe, another cache entry
    (root / "done.json").unlink()  # as if killed before the end
    (root / "teacher" / "config.json").write_text("{broken")
    embedded.build(other, log=messages.append)
    assert json.loads((root / "teacher" / "config.json").read_text())["num_hidden_layers"] == 4


def test_reference_rows_hold_both_modes_in_the_teacher_data_schema(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    rows = embedded.reference_rows(tokenizer, problems(3, seed=0, split="teacher-train"))
    assert [r["mode"] for r in rows] == ["think", "no_think"] * 3
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for r in rows:
        response = list(r["response_ids"])  # type: ignore[arg-type]
        assert response[-1] == eos and r["verdict"] == "kept"
        text = tokenizer.decode(response)
        # no_think: the template put the empty think block in the prompt already
        assert ("<think>" in text) == (r["mode"] == "think"), text
        assert "\\boxed{" in text
