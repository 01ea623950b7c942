"""Prompt sets from files: columns, message lists, answers, and errors that name the fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.errors import DistillError
from distill.prompts import embedded_prompts, load_prompts


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_message_lists_from_parquet_with_answers(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "question": [{"role": "user", "content": "What is 2 + 2?"}], "solution": "4"},
        {"id": "b", "question": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Half of 1?"},
        ], "solution": "1/2"},
        {"id": "c", "question": [{"role": "system", "content": "no user"}], "solution": "0"},
    ]  # fmt: skip
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompts = load_prompts(str(path), prompt_column="question", answer_column="solution")
    assert [p.id for p in prompts] == ["a", "b"]  # no user turn: skipped
    assert prompts[0].messages == ({"role": "user", "content": "What is 2 + 2?"},)
    assert prompts[1].messages[0]["role"] == "system" and prompts[1].answer == "1/2"


def test_strings_become_one_user_message_and_empty_ones_are_skipped(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "  "}, {"prompt": "Hi", "answer": 3}])
    (p,) = load_prompts(str(path))
    assert p.messages == ({"role": "user", "content": "Hi"},) and p.answer == "3" and p.id == "1"


def test_missing_answer_column_means_no_verification(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi there"}, {"prompt": "Bye"}])
    prompts = load_prompts(str(path), limit=1)
    assert len(prompts) == 1 and prompts[0].answer is None and prompts[0].id == "0"


def test_missing_prompt_column_lists_the_columns(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(
        DistillError, match=r"'prompt' not found.*\['question', 'answer'\].*--prompt-column"
    ):
        load_prompts(str(path))


def test_bad_cells_and_unreadable_files_are_named(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": 3}])
    with pytest.raises(DistillError, match="row 0 .* a prompt must be a string"):
        load_prompts(str(path))
    with pytest.raises(DistillError, match="cannot tell the format"):
        (tmp_path / "p.txt").write_text("hello")
        load_prompts(str(tmp_path / "p.txt"))
    with pytest.raises(DistillError, match="no non-empty prompts"):
        load_prompts(str(jsonl(tmp_path / "e.jsonl", [{"prompt": ""}])))


def test_an_unparsable_file_is_one_error_not_a_log_line_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("not json\n")
    with caplog.at_level(logging.DEBUG), pytest.raises(DistillError, match="JSON parse error"):
        load_prompts(str(path))
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert logging.getLogger("datasets").level != logging.CRITICAL  # restored


def test_embedded_prompts_are_seeded_and_verifiable() -> None:
    a, b = embedded_prompts(5, 0, "train"), embedded_prompts(5, 0, "train")
    assert a == b and all(p.answer is not None and p.answer.lstrip("-").isdigit() for p in a)
    assert embedded_prompts(5, 0, "eval") != a
