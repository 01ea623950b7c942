"""Chat formats found by rendering probes (switch, always, none), and every command in each.

The tiny trained pair gets two other templates: SmolLM2's ChatML (no thinking at all, and a
default system prompt it injects) and an always-thinking one (the generation prompt opens
`<think>`, earlier turns lose their reasoning, as DeepSeek-R1 distills and QwQ do).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from cli import app
from distill.tasks import problems
from teachers.chat import (
    check_modes,
    detect_format,
    modes_for,
    render_prompt,
    template_mismatch,
)
from teachers.protocol import TeacherError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# SmolLM2-135M-Instruct's template, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HISTORY = (
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' + m.content.split('</think>')[-1].lstrip('\n') + "
    "'<|im_end|>\n' -}}{%- else -%}{{- '<|im_start|>' + m.role + '\n' + m.content + "
    "'<|im_end|>\n' -}}{%- endif -%}{%- endfor -%}"
)
ALWAYS_TEMPLATE = (
    _HISTORY
    + "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}"
)
# R1-distill style before its template fix: the model opens the block itself; only the
# history handling (reasoning stripped) shows that it thinks.
ALWAYS_BY_HISTORY = (
    _HISTORY + "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
TEMPLATES = {"none": SMOLLM2_TEMPLATE, "always": ALWAYS_TEMPLATE}
MSGS = [{"role": "user", "content": "What is 2 + 3?"}]


def with_template(tokenizer: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    other = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
    )
    return other


def test_formats_are_found_by_rendering(tokenizer: PreTrainedTokenizerFast) -> None:
    assert detect_format(tokenizer) == "switch"
    assert detect_format(with_template(tokenizer, SMOLLM2_TEMPLATE)) == "none"
    assert detect_format(with_template(tokenizer, ALWAYS_TEMPLATE)) == "always"
    assert detect_format(with_template(tokenizer, ALWAYS_BY_HISTORY)) == "always"


def test_auto_modes_and_refusals(tokenizer: PreTrainedTokenizerFast) -> None:
    assert modes_for("auto", "switch") == ("think", "no_think")
    assert modes_for("auto", "always") == ("think",)
    assert modes_for("auto", "none") == ("plain",)
    plain = with_template(tokenizer, SMOLLM2_TEMPLATE)
    always = with_template(tokenizer, ALWAYS_TEMPLATE)
    assert check_modes(("plain",), plain) == "none"
    assert check_modes(("think",), always, thinking_budget=True) == "always"
    assert check_modes(("think", "no_think"), tokenizer, soft_switch=True) == "switch"
    for modes, tok, flags, needle in (
        (("think",), plain, {}, "no thinking switch and no think block"),
        (("no_think",), always, {}, "always-open think block"),
        (("plain",), tokenizer, {}, "a thinking switch"),
        (("plain",), plain, {"soft_switch": True}, "drop --soft-switch"),
        (("think",), always, {"soft_switch": True}, "drop --soft-switch"),
        (("plain",), plain, {"thinking_budget": True}, "drop --thinking-budget"),
    ):
        with pytest.raises(TeacherError, match=needle):
            check_modes(modes, tok, **flags)  # type: ignore[arg-type]


def test_plain_renders_the_template_as_it_is(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = with_template(tokenizer, SMOLLM2_TEMPLATE)
    text = plain.decode(render_prompt(plain, MSGS, "plain"))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text
    always = with_template(tokenizer, ALWAYS_TEMPLATE)
    assert always.decode(render_prompt(always, MSGS, "think")).endswith("assistant\n<think>\n")


def test_parity_shows_the_first_differing_token(tokenizer: PreTrainedTokenizerFast) -> None:
    a = with_template(tokenizer, SMOLLM2_TEMPLATE)
    b = with_template(tokenizer, SMOLLM2_TEMPLATE.replace("named SmolLM", "named Other"))
    assert template_mismatch(a, a, MSGS) is None
    diff = template_mismatch(a, b, MSGS)
    assert diff is not None and diff.startswith("mode plain: first difference at token")
    assert "'S' vs 'O'" in diff and "after ' assistant named '" in diff
    other = template_mismatch(a, with_template(tokenizer, ALWAYS_TEMPLATE), MSGS)
    assert other == "the templates' thinking formats differ: none vs always"


@pytest.fixture(scope="module")
def pairs(
    trained_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """format -> (teacher, student): the trained pair under each non-Qwen3 template."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt, template in TEMPLATES.items():
        dirs = []
        for role, src in zip(("teacher", "student"), trained_pair, strict=True):
            dst = root / fmt / role
            shutil.copytree(src, dst)
            tok = AutoTokenizer.from_pretrained(dst)
            tok.chat_template = template
            (dst / "chat_template.jinja").unlink(missing_ok=True)
            tok.save_pretrained(dst)
            dirs.append(dst)
        out[fmt] = (dirs[0], dirs[1])
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = problems(24, 0)
    path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in rows))
    return path


def ok(args: list[str]) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


@pytest.mark.parametrize("fmt", ["none", "always"])
def test_every_command_runs_in_the_format(
    fmt: str, pairs: dict[str, tuple[Path, Path]], prompt_file: Path, tmp_path: Path
) -> None:
    teacher, student = (str(p) for p in pairs[fmt])
    mode = "plain" if fmt == "none" else "think"
    run = str(tmp_path / "run")
    out = ok(["generate", "--run-dir", run, "--teacher", teacher, "--prompts", str(prompt_file),
              "--max-tokens", "64", "--store-topk", "4"])  # fmt: skip
    assert f"chat template format: {fmt}; modes: {mode}" in out
    rows = pq.read_table(tmp_path / "run" / "teacher_data").to_pylist()
    assert {r["mode"] for r in rows} == {mode}
    assert any(r["verdict"] == "kept" for r in rows), [r["verdict"] for r in rows]
    ok(["offpolicy", "--run-dir", run, "--student", student, "--steps", "2", "--batch-size", "4",
        "--micro-batch-size", "4"])  # fmt: skip
    out = ok(["onpolicy", "--run-dir", run, "--teacher", teacher, "--prompts", str(prompt_file),
              "--steps", "1", "--prompts-per-step", "2", "--max-tokens", "16", "--n-prompts", "8",
              "--top-k", "4"])  # fmt: skip
    assert "final loss" in out
    ok(["eval", "--run-dir", run, "--model", student, "--n-prompts", "2", "--n", "1", "--k", "1",
        "--max-tokens", "16", "--name", "s"])  # fmt: skip
    result = json.loads((tmp_path / "run" / "eval" / "s.json").read_text())
    assert set(result["modes"]) == {mode}
    out = ok(["teacher", "check", "--teacher", teacher, "--student", student,
              "--teacher-backend", "hf", "--n", "2", "--max-tokens", "8"])  # fmt: skip
    assert "KL(teacher || student)" in out and f"modes {mode}" in out
    ok(["rl", "--run-dir", str(tmp_path / "rl"), "--student", student, "--n-prompts", "4",
        "--eval-prompts", "2", "--steps", "1", "--prompts-per-step", "2",
        "--samples-per-prompt", "2", "--max-tokens", "8"])  # fmt: skip
    out = ok(["run", "--run-dir", str(tmp_path / "all"), "--teacher", teacher, "--student",
              student, "--prompts", str(prompt_file), "--n-prompts", "12", "--eval-prompts", "4",
              "--max-tokens", "48", "--offpolicy-steps", "2", "--offpolicy-batch-size", "4",
              "--onpolicy-steps", "1", "--top-k", "4"])  # fmt: skip
    evals = json.loads((tmp_path / "all" / "eval.json").read_text())
    assert f"accuracy_{mode}" in evals["after_onpolicy"]


@pytest.mark.parametrize(
    ("fmt", "extra", "needle"),
    [
        ("none", ["--modes", "think"], "pass --modes auto or plain"),
        ("none", ["--modes", "both"], "no thinking switch"),
        ("none", ["--thinking-budget", "8"], "drop --thinking-budget"),
        ("none", ["--soft-switch"], "drop --soft-switch"),
        ("always", ["--modes", "no_think"], "pass --modes auto or think"),
        ("always", ["--soft-switch"], "drop --soft-switch"),
    ],
)
def test_format_refusals_exit_2_before_any_record(
    fmt: str, extra: list[str], needle: str, pairs: dict[str, tuple[Path, Path]],
    prompt_file: Path, tmp_path: Path,
) -> None:  # fmt: skip
    teacher, _ = pairs[fmt]
    args = ["generate", "--run-dir", str(tmp_path), "--teacher", str(teacher), "--prompts",
            str(prompt_file), *extra]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "config.json").exists()


def test_a_student_whose_template_injects_another_system_prompt_is_refused(
    pairs: dict[str, tuple[Path, Path]], prompt_file: Path, tmp_path: Path
) -> None:
    teacher, student = pairs["none"]
    other = tmp_path / "student"
    shutil.copytree(student, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = SMOLLM2_TEMPLATE.replace("named SmolLM", "named Other")
    tok.save_pretrained(other)
    args = ["onpolicy", "--run-dir", str(tmp_path / "run"), "--teacher", str(teacher),
            "--student", str(other), "--prompts", str(prompt_file)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "first difference at token" in result.output and "Traceback" not in result.output
