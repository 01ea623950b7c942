"""Teacher data: schema (read by `datasets`), modes, budget, resume, refusal, overlong prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest

from distill import teacher_data
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.offpolicy import generate as gen
from distill.prompts import Prompt, embedded_prompts
from students.sample import Generation, SamplingParams
from teachers.chat import BUDGET_SENTENCE, render_prompt
from teachers.hf import HFTeacher
from teachers.protocol import TopK

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def teacher(tiny_pair) -> HFTeacher:  # type: ignore[no-untyped-def]
    return HFTeacher.from_pretrained(tiny_pair.teacher_dir)


def small(tmp_path: Path, **kw: object) -> gen.Config:
    base = gen.Config(run_dir=tmp_path, max_tokens=12, shard_size=5, max_prompt_tokens=256)
    return replace(base, **kw)  # type: ignore[arg-type]


EOS = 361  # the tiny tokenizer's <|im_end|> (checked in `test_scripted_eos`)


class Scripted:
    """A teacher answering every prompt of call n with `answers[n]` (the last one repeats).

    Crafted text for the filters and the budget; it stopped when its ids end in eos.
    """

    def __init__(self, *answers: Sequence[int], name: str = "scripted") -> None:
        self.answers, self._name = [list(a) for a in answers], name
        self.calls: list[int] = []

    @property
    def name(self) -> str:
        return self._name

    vocab_size = 500
    logits_width = 512
    max_top_k = 512

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        answer = self.answers[min(len(self.calls), len(self.answers) - 1)]
        self.calls.append(params.max_tokens)
        ids = np.asarray(answer[: params.max_tokens], dtype=np.int32)
        finish = "stop" if len(ids) and ids[-1] == EOS else "length"
        return [Generation(token_ids=ids, finish_reason=finish) for _ in prompts]

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int
    ) -> list[TopK]:
        raise AssertionError("not used")


def test_rows_follow_the_schema_and_load_with_datasets(tmp_path, tiny_pair, teacher) -> None:
    prompts = embedded_prompts(3, 0, "train")
    config = small(tmp_path, samples_per_prompt=2, store_topk=3)
    summary = gen.generate(config, teacher, tiny_pair.tokenizer, prompts, GpuLedger())
    assert summary.rows == 3 * 2 * 2 and summary.shards_written == 3  # 12 keys, shards of 5
    ds = datasets.load_dataset(
        "parquet", data_dir=str(tmp_path / "teacher_data"), split="train", cache_dir=str(tmp_path)
    )
    assert set(ds.column_names) == {f.name for f in teacher_data.schema(3)}
    assert len(set(ds["key"])) == 12
    for row in ds:
        assert isinstance(row, dict)
        R = len(row["response_ids"])
        assert len(row["forced"]) == R and np.asarray(row["topk_ids"]).shape == (R, 3)
        assert np.asarray(row["topk_logprobs"]).shape == (R, 3)
        assert row["teacher"] == teacher.name and row["mode"] in ("think", "no_think")
        assert row["messages"][-1]["role"] == "user"
        expected = render_prompt(tiny_pair.tokenizer, row["messages"], row["mode"])
        assert row["prompt_ids"] == expected
        assert (
            row["finish_reason"] in ("stop", "length") and row["verdict"] in teacher_data.VERDICTS
        )
        # Stored top-k are the teacher's own scores of its response (TopK alignment).
        assert np.allclose(row["topk_actual_logprobs"][0], np.max(row["topk_logprobs"][0]), atol=10)


def test_think_ratio_gives_each_prompt_one_mode_at_the_exact_share(tmp_path, tiny_pair) -> None:
    prompts = embedded_prompts(10, 0, "train")
    config = small(tmp_path, think_ratio=0.3, think_sampling=GREEDY, no_think_sampling=GREEDY)
    gen.generate(config, Scripted([5, 6, EOS]), tiny_pair.tokenizer, prompts, GpuLedger())
    rows = teacher_data.read_rows(tmp_path / "teacher_data", ["prompt_id", "mode"])
    assert [r["mode"] for r in rows].count("think") == 3 and len(rows) == 10
    assert len({r["prompt_id"] for r in rows}) == 10
    with pytest.raises(DistillError, match="think-ratio"):
        gen.check_config(replace(config, think_ratio=1.5))


@pytest.mark.parametrize("answered", [False, True])
def test_budget_forces_the_sentence_and_an_unanswered_budget_is_truncated(
    tmp_path, tiny_pair, answered
) -> None:
    tok = tiny_pair.tokenizer
    prompts = embedded_prompts(1, 0, "train")
    thinking = tok.encode("<think>\n1 + 2 = 3 and 4 + 5 = 9 and then", add_special_tokens=False)
    text = f"The answer is \\boxed{{{prompts[0].answer}}}." if answered else "  "
    after = tok.encode(text, add_special_tokens=False) + [EOS]
    teacher = Scripted(thinking * 3, after)  # phase 1 never closes the block by itself
    config = small(tmp_path, modes=("think",), thinking_budget=6, max_tokens=60)
    summary = gen.generate(config, teacher, tok, prompts, GpuLedger())
    row = teacher_data.read_rows(tmp_path / "teacher_data")[0]
    sentence = tok.encode(BUDGET_SENTENCE, add_special_tokens=False)
    forced = np.asarray(row["forced"])
    assert forced.sum() == len(sentence) and not forced[:6].any() and teacher.calls[0] == 6
    assert np.asarray(row["response_ids"])[forced].tolist() == sentence
    assert row["finish_reason"] == "stop" and row["thinking_tokens"] == 6 + len(sentence) - 1
    assert row["verdict"] == ("kept" if answered else "truncated")
    assert row["correct"] is answered and summary.kept == int(answered)


def test_rerun_skips_finished_shards_and_refuses_another_teacher(tmp_path, tiny_pair) -> None:
    tok = tiny_pair.tokenizer
    prompts = embedded_prompts(4, 0, "train")
    config = small(tmp_path)
    first = gen.generate(config, Scripted([7, 8, EOS]), tok, prompts, GpuLedger())
    again = gen.generate(config, Scripted([7, 8, EOS]), tok, prompts, GpuLedger())
    assert again.shards_skipped == first.shards_written == 2 and again.shards_written == 0
    before = sorted(p.name for p in (tmp_path / "teacher_data").iterdir())
    with pytest.raises(DistillError, match=r"teacher\).*--force"):
        gen.generate(config, Scripted([7, 8, EOS], name="other"), tok, prompts, GpuLedger())
    with pytest.raises(DistillError, match="config.max_tokens"):
        gen.generate(replace(config, max_tokens=9), Scripted([7, EOS]), tok, prompts, GpuLedger())
    assert sorted(p.name for p in (tmp_path / "teacher_data").iterdir()) == before
    forced = gen.generate(
        config, Scripted([9, EOS], name="other"), tok, prompts, GpuLedger(), force=True
    )
    assert forced.shards_written == 2
    kept_aside = tmp_path / "teacher_data.replaced-1"
    assert sorted(p.name for p in kept_aside.iterdir()) == before  # nothing lost


def test_overlong_prompts_are_dropped_or_truncated_with_a_count(tmp_path, tiny_pair) -> None:
    tok = tiny_pair.tokenizer
    short = embedded_prompts(2, 0, "train")
    long = Prompt(
        id="long",
        messages=({"role": "user", "content": "Ana has 3 apples. " * 40 + "How many?"},),
        answer="3",
    )
    limit = max(len(render_prompt(tok, p.messages, "think")) for p in short) + 4
    config = small(tmp_path / "drop", max_prompt_tokens=limit)
    dropped = gen.generate(config, Scripted([5, EOS]), tok, [*short, long], GpuLedger())
    assert dropped.dropped_prompts == 1 and dropped.rows == 4
    config = small(tmp_path / "cut", max_prompt_tokens=limit, overlong="truncate")
    cut = gen.generate(config, Scripted([5, EOS]), tok, [*short, long], GpuLedger())
    assert cut.truncated_prompts == 1 and cut.dropped_prompts == 0 and cut.rows == 6
    rows = [
        r
        for r in teacher_data.read_rows(tmp_path / "cut" / "teacher_data")
        if r["prompt_id"] == "long"
    ]
    for r in rows:
        assert len(r["prompt_ids"]) <= limit  # type: ignore[arg-type]
        assert r["messages"][0]["content"].endswith("How many?")  # type: ignore[index]
    with pytest.raises(DistillError, match="--overlong truncate"):
        gen.generate(
            small(tmp_path / "x", max_prompt_tokens=5), Scripted([5]), tok, [long], GpuLedger()
        )


def test_duplicate_prompt_ids_and_zero_usable_rows_are_named(tmp_path, tiny_pair) -> None:
    tok = tiny_pair.tokenizer
    p = embedded_prompts(2, 0, "train")
    with pytest.raises(DistillError, match="occurs twice"):
        gen.generate(small(tmp_path), Scripted([5]), tok, [p[0], p[0]], GpuLedger())
    summary = gen.generate(small(tmp_path), Scripted([5, 6]), tok, p, GpuLedger())
    assert summary.kept == 0
    with pytest.raises(DistillError, match="'truncated' filter.*--max-tokens"):
        gen.check_usable(summary)
    assert len(teacher_data.read_rows(tmp_path / "teacher_data")) == 4  # the rows stay on disk


def test_cli_bad_input_exits_2_with_one_line_and_keeps_the_data(tmp_path, tiny_pair) -> None:
    from typer.testing import CliRunner

    from cli import app

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "What is 1 + 2?", "answer": "3"}\n')
    base = ["generate", "--run-dir", str(tmp_path / "run"), "--teacher", str(tiny_pair.teacher_dir),
            "--prompts", str(prompts), "--max-tokens", "4"]  # fmt: skip
    runner = CliRunner()
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2 and "columns are ['question', 'answer']" in missing.output
    ok = runner.invoke(app, [*base, "--prompt-column", "question"])
    assert ok.exit_code == 2 and "'truncated' filter" in ok.output  # rows written, none usable
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "teacher_data").iterdir()}
    changed = runner.invoke(app, [*base, "--prompt-column", "question", "--max-tokens", "5"])
    assert changed.exit_code == 2 and "max_tokens" in changed.output and "--force" in changed.output
    after = {p.name: p.read_bytes() for p in (tmp_path / "run" / "teacher_data").iterdir()}
    assert after == before
    bad = runner.invoke(app, [*base, "--prompt-column", "question", "--overlong", "cut"])
    assert bad.exit_code == 2 and "choose drop or truncate" in bad.output
