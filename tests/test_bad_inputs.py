"""The bad-input corpus: each case is one test through the real CLI (typer's CliRunner).

Every case must end the same way: exit code 2, exactly one `error: ...` line naming the problem
and the fix, no traceback, and every file already in the run directory byte-for-byte intact (a
`witness` file stands for earlier work; cases with real earlier work check it too).
docs/reliability.md counts the cases.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM
from typer.testing import CliRunner

from cli import app
from distill.tasks import corpus
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer
from teachers.hf import HFTeacher
from teachers.protocol import TopK
from tests.conftest import TinyPair
from tests.test_reliability_kills import write_teacher_rows

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def refused(args: list[str], run_dir: Path | None, *needles: str) -> str:
    """Invoke; assert exit 2, one error line holding `needles`, and nothing in run_dir lost."""
    before = snapshot(run_dir) if run_dir is not None and run_dir.is_dir() else {}
    result = runner.invoke(app, args)
    out = result.output  # stdout and stderr, as a terminal shows them
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}\n{out[-2000:]}"
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    if run_dir is not None:
        for name, data in before.items():
            now = (run_dir / name).read_bytes()
            if name == "config.json" and now != data:  # a copied run records its new place
                assert without_run_dir(now) == without_run_dir(data), "config.json was changed"
                continue
            assert now == data, f"{name} was changed or lost"
    return errors[0]


def without_run_dir(raw: bytes) -> dict[str, dict[str, object]]:
    configs = json.loads(raw)
    return {phase: {k: v for k, v in c.items() if k != "run_dir"} for phase, c in configs.items()}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "witness.txt").write_text("earlier work")
    return run


def jsonl(path: Path, rows: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 4+4?", "answer": "8"}]


def gen(run: Path, teacher: Path, prompts: Path, *extra: str) -> list[str]:
    return ["generate", "--run-dir", str(run), "--teacher", str(teacher), "--prompts",
            str(prompts), "--max-tokens", "4", "--shard-size", "2", *extra]  # fmt: skip


# --- prompts files ---------------------------------------------------------------------------


def test_malformed_jsonl(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "What is 2+3?"}\n{"prompt": "What is\n')
    refused(gen(run_dir, tiny_pair.teacher_dir, bad), run_dir, "cannot read prompts",
            "JSON parse error", "pass a readable")  # fmt: skip


def test_missing_prompt_column(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", [{"question": "What is 2+3?"}])
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "'prompt' not found",
            "['question']", "--prompt-column")  # fmt: skip


def test_misnamed_prompt_column_flag(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", GOOD)
    args = gen(run_dir, tiny_pair.teacher_dir, p, "--prompt-column", "promt")
    refused(args, run_dir, "'promt' not found", "--prompt-column")


def test_empty_prompts(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "   \n"}])
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "no non-empty prompts")


def test_non_utf8_bytes(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9 au lait: 2+3?"}\n')
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "not UTF-8", "iconv")


def test_prompts_over_the_length_limit(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", GOOD)
    args = gen(run_dir, tiny_pair.teacher_dir, p, "--max-prompt-tokens", "5")
    refused(args, run_dir, "longer than --max-prompt-tokens 5", "--overlong truncate")


def test_prompt_cell_of_the_wrong_type(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": 17}])
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "row 0", "a prompt must be a string")


def test_message_without_content(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user"}]}])
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "{role, content} messages")


def test_duplicate_prompt_ids(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", [{"id": "a", **GOOD[0]}, {"id": "a", **GOOD[1]}])
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "'a' occurs twice", "unique")


def test_unknown_file_format(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text("What is 2+3?\n")
    refused(gen(run_dir, tiny_pair.teacher_dir, p), run_dir, "cannot tell the format", ".jsonl")


def test_missing_prompts_file(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    args = gen(run_dir, tiny_pair.teacher_dir, tmp_path / "nowhere.jsonl")
    refused(args, run_dir, "nowhere.jsonl", "pass a readable")


# --- generate settings and models ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--overlong", "cut", "choose drop or truncate"),
        ("--think-ratio", "1.5", "must lie in [0, 1]"),
        ("--modes", "deep", "not one of auto, think, no_think, both, plain"),
        ("--teacher-backend", "grpc", "must be one of hf, vllm, server"),
        ("--teacher-backend", "server", "needs --teacher-url"),
        ("--thinking-budget", "0", "must be >= 1"),
    ],
)
def test_bad_generate_setting(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path, flag: str,
                              value: str, needle: str) -> None:  # fmt: skip
    p = jsonl(tmp_path / "p.jsonl", GOOD)
    refused(gen(run_dir, tiny_pair.teacher_dir, p, flag, value), run_dir, needle)


def test_teacher_that_is_not_a_folder(run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", GOOD)
    refused(gen(run_dir, tmp_path / "no-teacher", p), run_dir, "not a model folder")


def test_teacher_folder_without_a_tokenizer(run_dir: Path, tmp_path: Path) -> None:
    p = jsonl(tmp_path / "p.jsonl", GOOD)
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(gen(run_dir, empty, p), run_dir, "holds no tokenizer", "holds nothing",
            "with its tokenizer")  # fmt: skip
    (empty / "config.json").write_text("{}")
    refused(gen(run_dir, empty, p), run_dir, "holds no tokenizer", "['config.json']")


def plain_template(src: Path, dst: Path) -> Path:
    """A copy of `src` whose chat template knows nothing of thinking."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("modes", ["think", "no_think"])
def test_template_without_thinking_asked_for_a_mode(
    tiny_pair: TinyPair, run_dir: Path, tmp_path: Path, modes: str
) -> None:
    teacher = plain_template(tiny_pair.teacher_dir, tmp_path / "plain")
    args = gen(run_dir, teacher, jsonl(tmp_path / "p.jsonl", GOOD), "--modes", modes)
    refused(args, run_dir, "no thinking switch", "pass --modes auto or plain")


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_teacher_logprobs(
    tiny_pair: TinyPair, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    poison: float,
) -> None:  # fmt: skip
    real = HFTeacher._score_batch

    def poisoned(self: HFTeacher, *args: object, **kwargs: object) -> list[TopK]:
        out = real(self, *args, **kwargs)  # type: ignore[arg-type]
        lp = out[-1].logprobs  # a decoded copy (TopK is held packed): poison it, then rebuild
        lp[-1, -1] = np.float32(poison)
        out[-1] = TopK(ids=out[-1].ids, logprobs=lp, actual_logprobs=out[-1].actual_logprobs)
        return out

    monkeypatch.setattr(HFTeacher, "_score_batch", poisoned)
    args = gen(run_dir, tiny_pair.teacher_dir, jsonl(tmp_path / "p.jsonl", GOOD),
               "--store-topk", "4")  # fmt: skip
    refused(args, run_dir, "NaN or inf log-probabilities", "dtype")
    assert not list(run_dir.glob("teacher_data/shard-*"))  # nothing poisoned was stored


def test_top_k_above_the_teacher_limit(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    args = gen(run_dir, tiny_pair.teacher_dir, jsonl(tmp_path / "p.jsonl", GOOD),
               "--store-topk", "999")  # fmt: skip
    refused(args, run_dir, "--store-topk 999 is above", "(512)", "--max-logprobs")
    assert not (run_dir / "teacher_data").exists()  # refused before any generation


# --- run directory state ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `generate` run: 3 prompts x 2 modes in 3 shards (all truncated: exit 2)."""
    root = tmp_path_factory.mktemp("generated")
    prompts = jsonl(root / "p.jsonl", [*GOOD, {"prompt": "What is 1+6?", "answer": "7"}])
    result = runner.invoke(app, gen(root / "run", tiny_pair.teacher_dir, prompts))
    assert result.exit_code == 2 and len(list((root / "run").glob("teacher_data/shard-*"))) == 3
    return root


def copy_run(generated: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(generated, tmp_path / "g")
    return tmp_path / "g" / "run", tmp_path / "g" / "p.jsonl"


def test_full_disk_keeps_earlier_shards(
    tiny_pair: TinyPair, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, prompts = copy_run(generated, tmp_path)
    done = run / "teacher_data" / "shard-00001.parquet"
    done.unlink()  # the rerun regenerates it ...
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) >= 2:  # ... config.json is rewritten, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    refused(gen(run, tiny_pair.teacher_dir, prompts), run, "no space left", "free space",
            "rerun the same command")  # fmt: skip
    assert not done.exists() and not list(run.rglob("*.tmp")), "a partial shard is visible"


def test_unwritable_run_directory(tiny_pair: TinyPair, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = gen(blocker / "run", tiny_pair.teacher_dir, jsonl(tmp_path / "p.jsonl", GOOD))
    refused(args, None, "cannot write to run directory", "--run-dir")
    assert blocker.read_text() == "not a directory"


def test_resume_with_a_changed_config(tiny_pair: TinyPair, generated: Path, tmp_path: Path) -> None:
    run, prompts = copy_run(generated, tmp_path)
    refused(gen(run, tiny_pair.teacher_dir, prompts, "--seed", "9"), run,
            "different config (changed: seed)", "--force")  # fmt: skip


def test_resume_with_changed_prompts(tiny_pair: TinyPair, generated: Path, tmp_path: Path) -> None:
    run, _ = copy_run(generated, tmp_path)
    other = jsonl(tmp_path / "other.jsonl", GOOD[:1])
    refused(gen(run, tiny_pair.teacher_dir, other), run, "another run (differs in: prompts)")


def test_truncated_shard_on_rerun(tiny_pair: TinyPair, generated: Path, tmp_path: Path) -> None:
    run, prompts = copy_run(generated, tmp_path)
    shard = run / "teacher_data" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:300])  # a partial copy from elsewhere
    refused(gen(run, tiny_pair.teacher_dir, prompts), run, "shard-00001.parquet is damaged",
            "delete that file")  # fmt: skip


@pytest.mark.parametrize("name", ["config.json", "teacher_data/.dataset.json"])
def test_corrupt_json_in_the_run_directory(
    tiny_pair: TinyPair, generated: Path, tmp_path: Path, name: str
) -> None:
    run, prompts = copy_run(generated, tmp_path)
    (run / name).write_text('{"generate": ')
    refused(gen(run, tiny_pair.teacher_dir, prompts), run, "is not valid JSON", "restore it")


# --- offpolicy -------------------------------------------------------------------------------


def off(run: Path, student: Path, *extra: str) -> list[str]:
    return ["offpolicy", "--run-dir", str(run), "--student", str(student), "--steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--save-every", "1",
            *extra]  # fmt: skip


@pytest.fixture
def with_data(run_dir: Path, tiny_pair: TinyPair) -> Path:
    write_teacher_rows(run_dir / "teacher_data", tiny_pair.tokenizer, 8)
    return run_dir


@pytest.fixture(scope="module")
def trained(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offpolicy run with a checkpoint, to be damaged by the tests."""
    run = tmp_path_factory.mktemp("trained") / "run"
    write_teacher_rows(run / "teacher_data", tiny_pair.tokenizer, 8)
    result = runner.invoke(app, off(run, tiny_pair.student_dir))
    assert result.exit_code == 0, result.output
    return run


def test_offpolicy_without_teacher_data(tiny_pair: TinyPair, run_dir: Path) -> None:
    refused(off(run_dir, tiny_pair.student_dir), run_dir, "no teacher data", "distill generate")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch-size", "16", "--micro-batch-size", "16"], "fewer than --batch-size 16"),
        (["--kd-weight", "0.5"], "regenerate with --store-topk"),
        (["--think-block", "middle"], "choose prompt or target"),
        (["--report-to", "carrier-pigeon"], "--report-to"),
        (["--batch-size", "6", "--micro-batch-size", "4"], "must be a multiple"),
    ],
)
def test_bad_offpolicy_setting(tiny_pair: TinyPair, with_data: Path, extra: list[str],
                               needle: str) -> None:  # fmt: skip
    refused(off(with_data, tiny_pair.student_dir, *extra), with_data, needle)


def test_all_rows_filtered_out(tiny_pair: TinyPair, run_dir: Path) -> None:
    write_teacher_rows(run_dir / "teacher_data", tiny_pair.tokenizer, 8)
    shard = run_dir / "teacher_data" / "shard-00000.parquet"
    rows = pq.read_table(shard).to_pylist()
    pq.write_table(pa.Table.from_pylist([{**r, "verdict": "truncated"} for r in rows]), shard)
    refused(off(run_dir, tiny_pair.student_dir), run_dir, "no usable teacher responses",
            "truncated: 8")  # fmt: skip


def test_student_that_is_not_a_folder(run_dir: Path, tmp_path: Path) -> None:
    refused(off(run_dir, tmp_path / "no-student"), run_dir, "no-student", "local model folder")


def test_truncated_shard_in_training_data(tiny_pair: TinyPair, with_data: Path) -> None:
    shard = with_data / "teacher_data" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-200])
    refused(off(with_data, tiny_pair.student_dir), with_data, "is damaged", "distill generate")


def test_teacher_student_tokenizer_mismatch_in_data(
    tiny_pair: TinyPair, with_data: Path, tmp_path: Path
) -> None:
    small = train_tokenizer(corpus(200, seed=9), vocab_size=300)
    student = tmp_path / "small-student"
    save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-student"], small, seed=2), small, student)
    refused(off(with_data, student), with_data, "holds token id", "300 ids", "shares the teacher")


def test_logits_width_below_the_vocabulary(
    tiny_pair: TinyPair, with_data: Path, tmp_path: Path
) -> None:
    config = AutoConfig.from_pretrained(tiny_pair.student_dir)
    ids = len(tiny_pair.tokenizer)
    config.vocab_size = ids - 40  # a head that cannot score the last 40 tokenizer ids
    config.pad_token_id = 0  # the real pad id is one of those
    student = tmp_path / "narrow"
    save_pretrained(Qwen3ForCausalLM(config), tiny_pair.tokenizer, student)
    refused(off(with_data, student), with_data, f"{ids - 40} output rows", f"{ids} ids")


def test_corrupt_checkpoint_state(tiny_pair: TinyPair, trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "offpolicy" / "checkpoint" / "trainer_state.pt").write_bytes(b"\x80\x04garbage")
    refused(off(run, tiny_pair.student_dir), run, "is damaged", "delete that folder")


def test_truncated_checkpoint_weights(tiny_pair: TinyPair, trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = run / "offpolicy" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(off(run, tiny_pair.student_dir), run, "model.safetensors: truncated", "delete that")


def test_teacher_data_changed_since_the_checkpoint(
    tiny_pair: TinyPair, trained: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    write_teacher_rows(run / "teacher_data", tiny_pair.tokenizer, 10)
    refused(off(run, tiny_pair.student_dir), run, "changed since checkpoint", "new --run-dir")


def test_offpolicy_resume_with_a_changed_config(
    tiny_pair: TinyPair, trained: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    refused(off(run, tiny_pair.student_dir, "--lr", "0.5"), run, "changed: lr", "--force")


# --- onpolicy --------------------------------------------------------------------------------


def on(run: Path, pair: TinyPair, *extra: str, student: Path | None = None) -> list[str]:
    return ["onpolicy", "--run-dir", str(run), "--teacher", str(pair.teacher_dir), "--student",
            str(student or pair.student_dir), "--steps", "1", "--max-tokens", "4",
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--divergence", "hellinger"], "--divergence 'hellinger' is unknown"),
        (["--lmbda", "1.5"], "must lie in [0, 1]"),
        (["--truncation", "cut"], "choose mask, drop or keep"),
    ],
)
def test_bad_onpolicy_setting(tiny_pair: TinyPair, run_dir: Path, extra: list[str],
                              needle: str) -> None:  # fmt: skip
    refused(on(run_dir, tiny_pair, *extra), run_dir, needle)


def test_onpolicy_tokenizer_mismatch(tiny_pair: TinyPair, run_dir: Path, tmp_path: Path) -> None:
    other = train_tokenizer(corpus(200, seed=9), vocab_size=450)
    student = tmp_path / "other"
    save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-student"], other, seed=2), other, student)
    refused(on(run_dir, tiny_pair, student=student), run_dir, "tokenizers differ", "ids differ")


def test_every_rank_proves_the_shared_run_directory_writable_at_once(tmp_path: Path) -> None:
    """The ranks of a job (on one machine, or on several over a shared filesystem) all call
    rundir.prepare on one folder at the same moment: no rank may trip over another's probe (a
    fixed probe name did, one run in three of tests/test_multi_machine.py)."""
    from multiprocessing import get_context

    ctx = get_context("spawn")
    start = time.time() + 3.0  # every process begins together, after its interpreter starts
    with ctx.Pool(4) as pool:
        made = pool.starmap(prepare_many, [(tmp_path / "run", start)] * 4)
    assert made == [2000] * 4
    assert list((tmp_path / "run").iterdir()) == []  # no probe left behind


def prepare_many(run_dir: Path, start: float) -> int:
    from distill import rundir

    time.sleep(max(0.0, start - time.time()))
    for _ in range(2000):
        rundir.prepare(run_dir)
    return 2000


def test_a_library_error_is_cut_at_a_sentence_end_not_mid_address() -> None:
    from students.load import first_sentences

    hub = (
        "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
        "them in the cached files.\n Check your internet connection or see how to run the "
        "library in offline mode at 'https://huggingface.co/docs/transformers/installation'."
    )
    assert first_sentences(hub) == hub.split("\n")[0]  # whole first sentence, one line
    assert first_sentences("a  b\nc") == "a b c"  # short: kept whole, on one line
    assert first_sentences("x" * 300) == "x" * 200 + "..."  # no sentence end: marked as cut
