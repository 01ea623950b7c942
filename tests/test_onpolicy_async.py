"""Asynchronous on-policy steps (--max-staleness): S = 0 is the synchronous loop unchanged, the
bound holds on every trained sequence, a kill mid-queue resumes with every step trained once,
and the ledger charges overlapping phases once per device group."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from distill import accounting
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.onpolicy import train as onpolicy
from distill.onpolicy.ahead import sampled_version
from distill.prompts import embedded_prompts
from distill.rundir import read_metrics
from teachers.hf import HFTeacher
from tests.conftest import TinyPair
from tests.test_onpolicy_train import Recorder, config

GOLDEN = Path(__file__).parent / "data" / "onpolicy_s0_golden.json"
TIMING = ("sample_tokens_per_s", "score_tokens_per_s", "train_tokens_per_s", "step_seconds")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def teacher(tiny_pair: TinyPair) -> HFTeacher:
    return HFTeacher.from_pretrained(tiny_pair.teacher_dir)


def no_producer_left() -> bool:
    return not any(t.name == "distill-ahead" for t in threading.enumerate())


def test_staleness_0_is_the_synchronous_loop(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    """The metrics the synchronous loop wrote before --max-staleness existed, to the last bit
    on the machine that wrote them (tests/data). Another CPU's kernels move them by up to ~3e-6
    relative (a gradient norm), and a KL of ~1e-3, a difference of log-probabilities of ~5 nats,
    by ~2e-8 absolute: 1e-5 relative, 1e-7 absolute. A changed step moves them by far more."""
    rec = Recorder()
    cfg = config(tmp_path, tiny_pair.student_dir, steps=3, lr=3e-3, thinking_budget=6,
                 save_every=100)  # fmt: skip
    assert cfg.max_staleness == 0
    onpolicy.train(cfg, teacher, embedded_prompts(16, 0, "train"), GpuLedger(), rec)
    golden = json.loads(GOLDEN.read_text())["steps"]
    assert len(rec.steps) == len(golden)
    for got, want in zip(rec.steps, golden, strict=True):
        mine = {k: v for k, v in got.items() if k in want}
        assert mine == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert (got["staleness_max"], got["queue_depth"]) == (0.0, 0.0)


@pytest.mark.parametrize("S", [1, 2])
def test_no_step_trains_on_a_sequence_older_than_the_bound(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path, S: int
) -> None:
    prompts = embedded_prompts(16, 0, "train")
    kw = {"steps": 4, "lr": 3e-3, "save_every": 100, "max_staleness": S}
    runs = []
    for name in ("a", "b"):
        ledger = GpuLedger()
        onpolicy.train(config(tmp_path / name, tiny_pair.student_dir, **kw), teacher, prompts,
                       ledger)  # fmt: skip
        runs.append([m for m in read_metrics(tmp_path / name) if m.get("phase") == "onpolicy"])
        # every second once: the student's devices, whatever overlapped
        assert ledger.total_device_hours() * 3600 == pytest.approx(ledger.wall_seconds())
        assert 0.0 < ledger.busy_fractions()["student"] <= 1.0
    a, b = runs
    assert [m["step"] for m in a] == [0, 1, 2, 3]
    for m in a:  # the recorded versions: step - version for every trained sequence
        assert m["staleness_max"] <= S
        assert m["staleness_max"] == m["step"] - sampled_version(m["step"], 0, S)
        assert m["queue_depth"] <= S
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # versions never depend on timing
    assert no_producer_left()


def test_staleness_1_trains_step_0_as_the_synchronous_loop(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    """Step 0 is sampled from the start's weights either way; step 1 from version 0, not 1."""
    prompts, kw = embedded_prompts(16, 0, "train"), {"steps": 2, "lr": 3e-3, "save_every": 100}
    sync, ahead = Recorder(), Recorder()
    onpolicy.train(config(tmp_path / "s0", tiny_pair.student_dir, **kw), teacher, prompts,
                   GpuLedger(), sync)  # fmt: skip
    onpolicy.train(config(tmp_path / "s1", tiny_pair.student_dir, max_staleness=1, **kw),
                   teacher, prompts, GpuLedger(), ahead)  # fmt: skip
    assert sync.steps[0]["loss"] == ahead.steps[0]["loss"]
    assert sync.steps[1]["loss"] != ahead.steps[1]["loss"]


def test_a_kill_mid_queue_resumes_with_every_step_trained_once(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    prompts = embedded_prompts(16, 0, "train")
    kw = {"steps": 5, "save_every": 2, "lr": 3e-3, "max_staleness": 2}
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # at step 3: steps 4 (and 5's wait) in flight
        onpolicy.train(config(run, tiny_pair.student_dir, **kw), teacher, prompts, GpuLedger(),
                       Recorder(stop_after=4))  # fmt: skip
    assert no_producer_left()  # the queue was discarded with its thread
    shutil.copytree(run, tmp_path / "again")  # the same kill, resumed twice
    results = []
    for where in (run, tmp_path / "again"):
        rec, ledger = Recorder(), GpuLedger.load(where / "ledger.json")
        onpolicy.train(config(where, tiny_pair.student_dir, **kw), teacher, prompts, ledger, rec)
        results.append(rec.steps)
        assert ledger.phases["student.train"].calls == 2 + 3  # checkpointed 2, then 3 more
    first, second = results
    assert [m["loss"] for m in first] == [m["loss"] for m in second]  # the queue rebuilt exactly
    # re-sampled from the checkpoint's weights (after step 1): versions 2, 2, 2
    assert [m["staleness_max"] for m in first] == [0.0, 1.0, 2.0]
    import torch

    state = torch.load(run / "onpolicy" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["prompt_position"]) == (4, 5 * 4)  # every slot consumed once
    record = [m["step"] for m in read_metrics(run) if m.get("phase") == "onpolicy"]
    assert sorted(set(record)) == [0, 1, 2, 3, 4]  # none lost; 2 logged before the kill and after


def test_lora_students_sample_ahead_from_a_copy_of_their_adapters(
    tiny_pair: TinyPair, teacher: HFTeacher, tmp_path: Path
) -> None:
    """Only the adapters train, so only they are snapshotted; the copy samples version k - 1."""
    rec = Recorder()
    cfg = config(tmp_path, tiny_pair.student_dir, steps=3, lr=3e-3, save_every=100,
                 max_staleness=1, lora_rank=4)  # fmt: skip
    onpolicy.train(cfg, teacher, embedded_prompts(16, 0, "train"), GpuLedger(), rec)
    assert [m["staleness_max"] for m in rec.steps] == [0.0, 1.0, 1.0]
    assert no_producer_left()


def test_staleness_needs_sync_every_1() -> None:
    with pytest.raises(DistillError, match="--sync-every 1"):
        onpolicy.Config(run_dir=Path("r"), student="s", max_staleness=1, sync_every=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def in_thread(ledger: GpuLedger, name: str) -> tuple[threading.Thread, threading.Event]:
    """A phase held open by another thread until the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ledger.phase(name):
            entered.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait()
    return thread, release


def test_overlapping_phases_charge_each_device_group_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(accounting.time, "perf_counter", clock)
    ledger = GpuLedger("cpu", devices=1, teacher_devices=2)
    scoring, done = in_thread(ledger, "teacher.score")  # the producer's thread
    clock.now += 4  # teacher works, student waits
    with ledger.phase("student.train"):
        clock.now += 6  # both groups work
        done.set()
        scoring.join()
        clock.now += 3  # the student alone: the teacher is reserved
    clock.now += 1  # nobody works
    ledger.save(Path("/dev/null"))
    seconds = {k: v * 3600 for k, v in ledger.device_hours().items()}
    assert seconds == pytest.approx(
        {
            "teacher.score": 2 * 10,
            "waiting": 1 * 4 + 3 * 1,
            "student.train": 9,
            "teacher.reserved": 2 * 3,
        }  # fmt: skip
    )
    assert ledger.wall_seconds() == pytest.approx(14)
    assert ledger.total_device_hours() * 3600 == pytest.approx(14 * 3)  # never double-counted
    assert ledger.busy_fractions() == pytest.approx({"student": 9 / 14, "teacher": 10 / 14})


def test_phases_sharing_a_group_split_its_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(accounting.time, "perf_counter", clock)
    ledger = GpuLedger("cpu", devices=2)  # an in-process teacher works on the student's devices
    sampling, done = in_thread(ledger, "student.sample")
    with ledger.phase("student.train", devices=2):
        clock.now += 6
        done.set()
        sampling.join()
    ledger.save(Path("/dev/null"))
    seconds = {k: v * 3600 for k, v in ledger.device_hours().items()}
    assert seconds == pytest.approx({"student.sample": 6, "student.train": 6})
    assert ledger.total_device_hours() * 3600 == pytest.approx(6 * 2)
    assert ledger.busy_fractions() == {"student": 1.0}


@pytest.mark.parametrize("S", [1, 2])
def test_the_producer_samples_its_own_copy_at_the_bound(tiny_pair: TinyPair, S: int) -> None:
    """Ahead with a stand-in step: what the sampler's model holds when each step is produced is
    exactly weight version max(k - S, 0), never the training model itself."""
    import copy

    import torch

    from distill.onpolicy.ahead import Ahead, Produced
    from distill.onpolicy.metrics import Lengths
    from students.sample import HFSampler

    model = copy.deepcopy(tiny_pair.student)
    weight = model.get_input_embeddings().weight
    seen: dict[int, float] = {}

    def produce(step: int, version: int, sampler: HFSampler) -> Produced:
        assert sampler.model is not model
        seen[step] = sampler.model.get_input_embeddings().weight[0, 0].item()
        return Produced(step=step, slots=[], rollouts=[], lengths=Lengths.of([]), n_sampled=0,
                        n_scored=0, sample_seconds=0.0, score_seconds=0.0)  # fmt: skip

    sampler = HFSampler(model, eos_id=0, pad_id=0, vocab_size=500)
    versions = [weight[0, 0].item()]
    with Ahead(produce, lambda b: b, sampler, model, start=0, steps=6, max_staleness=S) as source:
        for step in range(6):
            source.take(step)
            with torch.no_grad():
                weight.add_(1.0)  # the update of this step: version step + 1
            versions.append(weight[0, 0].item())
            source.publish(step + 1)
    assert seen == {k: versions[max(k - S, 0)] for k in range(6)}
    assert no_producer_left()


def test_the_command_samples_ahead_and_reports_busy_fractions(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cli import app

    args = ["onpolicy", "--run-dir", str(tmp_path), "--teacher", str(tiny_pair.teacher_dir),
            "--student", str(tiny_pair.student_dir), "--steps", "3", "--prompts-per-step", "2",
            "--max-tokens", "8", "--n-prompts", "8", "--max-staleness", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    steps = [m for m in read_metrics(tmp_path) if m.get("phase") == "onpolicy"]
    assert [m["staleness_max"] for m in steps] == [0.0, 1.0, 1.0]
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert 0 < saved["busy_fractions"]["student"] <= 1
    shown = CliRunner().invoke(app, ["report", "show", str(tmp_path)])
    assert "busy (share of" in shown.output, shown.output
    bad = CliRunner().invoke(app, [*args[:-1], "-1"])
    assert bad.exit_code == 2 and "--max-staleness -1" in bad.output


def test_a_failure_ahead_is_raised_in_the_trainer_and_stops_both_threads(
    tiny_pair: TinyPair,
) -> None:
    from distill.onpolicy.ahead import Ahead, Produced
    from students.sample import HFSampler

    def sample(step: int, version: int, sampler: HFSampler) -> Produced:
        raise ConnectionError(f"teacher gone at step {step}")

    sampler = HFSampler(tiny_pair.student, eos_id=0, pad_id=0, vocab_size=500)
    source = Ahead(sample, lambda b: b, sampler, tiny_pair.student, start=0, steps=4,
                   max_staleness=1)  # fmt: skip
    with pytest.raises(ConnectionError, match="step 0"), source:
        source.take(0)
    assert no_producer_left()
