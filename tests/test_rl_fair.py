"""A fair RL baseline: RL samples, syncs, trains (LoRA, fused loss) through the distillation loops'
own code, records how it was built, and `report compare` warns where two runs were built apart."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel
from typer.testing import CliRunner

from cli import app
from distill import evaluate
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.fused_loss import policy_gradient_loss
from distill.prompts import embedded_prompts
from distill.report_schema import SCHEMA, export, from_run_dir, validate
from distill.rl import train as rl
from distill.sampling import mode_params
from students.sample import Generation, SamplingParams, sample
from teachers.chat import Mode
from tests.conftest import TinyPair
from tests.test_fused_loss import _assert_close, _batch, _grads, _student

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_policy_gradient_fused_equals_the_logits_path() -> None:
    model = _student()
    batch, _ = _batch()
    adv = torch.tensor([1.0, -0.5, 0.25])  # (B,): one advantage per sequence
    share, summed = rl.logits_loss(model, batch, adv, 7.0, 500)
    share.backward()
    ref = _grads(model)
    f_share, f_summed = policy_gradient_loss(model, model.lm_head.weight, batch, adv, 7.0, 500)
    f_share.backward()
    assert abs(float(f_summed) - float(summed)) <= 1e-5 * abs(float(summed))
    assert abs(float(f_share.detach()) - float(share.detach())) <= 1e-5 * abs(float(summed))
    _assert_close(_grads(model), ref, rel=1e-4)


class Recorder:
    """A Sampler that samples the last synced model as students.sample does, and records."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.model: PreTrainedModel | None = None
        self.syncs = 0
        self.calls: list[tuple[int, SamplingParams]] = []  # (sync count, params)

    def sync(self, model: PreTrainedModel) -> None:
        self.model, self.syncs = model, self.syncs + 1

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        assert self.model is not None, "generate before the first sync"
        self.calls.append((self.syncs, params))
        was = self.model.training
        self.model.eval()
        try:
            return sample(self.model, prompts, params, eos_id=int(self.tok.eos_token_id),
                          pad_id=int(self.tok.pad_token_id), vocab_size=len(self.tok))  # fmt: skip
        finally:
            self.model.train(was)


def config(run_dir: Path, student: Path, **kw: Any) -> rl.Config:
    base: dict[str, Any] = dict(
        run_dir=run_dir, student=str(student), steps=3, prompts_per_step=2, samples_per_prompt=2,
        max_tokens=6, save_every=3, log_every=1, format_weight=0.5, lr=1e-3, warmup_steps=1,
    )  # fmt: skip
    return rl.Config(**{**base, **kw})


def run(cfg: rl.Config, sampler: Recorder | None = None) -> rl.Summary:
    prompts = embedded_prompts(8, 0, "train")
    held = embedded_prompts(1, 0, "eval")
    return rl.train(cfg, prompts, held, evaluate.Config(prompts=1, max_tokens=4), GpuLedger(),
                    sampler=sampler)  # fmt: skip


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def hf_run(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("rl_hf")
    run(config(run_dir, tiny_pair.student_dir, sampler="hf"))
    return run_dir


def test_rl_samples_syncs_and_seeds_through_the_shared_sampler(
    tiny_pair: TinyPair, hf_run: Path, tmp_path: Path
) -> None:
    recorder = Recorder(tiny_pair.tokenizer)
    summary = run(config(tmp_path, tiny_pair.student_dir, sync_every=2), recorder)
    assert recorder.syncs == 2  # before step 0 and step 2, as on-policy's sync schedule
    presets: dict[Mode, SamplingParams] = {
        "think": rl.Config.think_sampling,
        "no_think": rl.Config.no_think_sampling,
    }
    seeds = {(p.seed, p.temperature, p.max_tokens) for _, p in recorder.calls}
    expected = {
        (p.seed, p.temperature, p.max_tokens)
        for step in range(3)
        for p in mode_params(presets, max_tokens=6, seed=0, step=step).values()
    }
    assert seeds <= expected and len(seeds) >= 3  # one call per mode present, seeded per step
    # The built-in hf sampler draws exactly what the shared code draws: the same final weights.
    mine, built_in = weights(summary.checkpoint), weights(hf_run / "rl" / "checkpoint")
    assert mine.keys() == built_in.keys()
    assert all(torch.equal(mine[k], built_in[k]) for k in mine)


def test_manifest_records_the_setup_and_compare_names_each_difference(
    hf_run: Path, tmp_path: Path
) -> None:
    setup = json.loads((hf_run / "manifest.json").read_text())["setup"]["rl"]
    assert setup["sampler"] == "hf" and setup["sampler_dtype"] == "float32"
    assert setup["dtype"] == "float32" and setup["loss_path"] == "fused"
    assert setup["layout"] == "1 x cpu" and setup["lora_rank"] == 0
    # pytest runs on glibc (only the `distill` command reruns itself on tcmalloc)
    assert setup["allocator"] == "glibc, trimmed before each layer"
    assert from_run_dir(hf_run).setup == {
        "sampler": "hf, float32",
        "precision": "float32",
        "loss_path": "fused",
        "processes": "1 x cpu",
        "lora": "none (every weight)",
        "allocator": "glibc, trimmed before each layer",
    }
    other = tmp_path / "rl_vllm"
    shutil.copytree(hf_run, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["setup"]["rl"].update(sampler="vllm", sync_every=4, sampler_dtype="bfloat16")
    manifest["setup"]["rl"].update(dtype="bfloat16", allocator="tcmalloc")
    (other / "manifest.json").write_text(json.dumps(manifest))
    runner = CliRunner()
    same = runner.invoke(app, ["report", "compare", str(hf_run), str(hf_run), "--json"])
    assert same.exit_code == 0 and not any(
        "differ in" in w for w in json.loads(same.output)["warnings"]
    )
    result = runner.invoke(app, ["report", "compare", str(hf_run), str(other), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    differ = [w for w in out["warnings"] if "differ in" in w]
    assert len(differ) == 3, differ  # sampler, precision, allocator; loss path, layout, LoRA agree
    assert any(w.startswith("the runs differ in allocator") for w in differ)
    sampler = next(w for w in differ if w.startswith("the runs differ in sampler"))
    assert f"{hf_run.name}: hf, float32" in sampler
    assert "rl_vllm: vllm, bfloat16, sync every 4" in sampler
    assert out["runs"][1]["setup"]["sampler"] == "vllm, bfloat16, sync every 4"
    table = runner.invoke(app, ["report", "compare", str(hf_run), str(other)],
                          env={"COLUMNS": "250"})  # fmt: skip
    assert table.exit_code == 0 and "How each run was built" in table.output
    assert "sampler (differs)" in table.output and "the runs differ in sampler" in table.output


def test_imported_reports_state_their_setup_and_bad_keys_name_the_fix() -> None:
    data = {
        "schema": SCHEMA, "method": "GRPO (verl)", "device": "H100",
        "device_hours": {"student.sample": 10.0}, "eval": {"final": {"pass@1_think": 0.5}},
        "setup": {"sampler": "vllm, sync every 1", "precision": "bfloat16"},
    }  # fmt: skip
    report = validate(data, "verl.json")
    assert report.setup["sampler"] == "vllm, sync every 1"
    assert validate(export(report), "again.json").setup == report.setup
    with pytest.raises(DistillError, match="did you mean 'sampler'"):
        validate({**data, "setup": {"samplr": "vllm"}}, "verl.json")


def test_rl_with_lora_saves_merged_weights_and_resumes_exactly(
    tiny_pair: TinyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("peft")
    # A random tiny student is never right: reward even-length texts, so groups carry signal.
    monkeypatch.setattr(rl, "verify", lambda text, answer: len(text) % 2 == 0)
    wide = SamplingParams(temperature=1.0)  # unfiltered: the G samples of a group differ
    kw: dict[str, Any] = dict(lora_rank=4, save_every=1, sampler="hf", samples_per_prompt=4,
                              think_sampling=wide, no_think_sampling=wide)  # fmt: skip
    whole = run(config(tmp_path / "whole", tiny_pair.student_dir, steps=2, **kw))
    part = tmp_path / "part"
    run(config(part, tiny_pair.student_dir, steps=1, **kw))
    resumed = run(config(part, tiny_pair.student_dir, steps=2, **kw))
    a, b = weights(whole.checkpoint), weights(resumed.checkpoint)
    assert not any("lora" in k for k in a)  # a plain from_pretrained model, adapters merged
    start = weights(tiny_pair.student_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the adapters learned something
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((part / "manifest.json").read_text())["setup"]["rl"]["lora_rank"] == 4


def test_cli_refuses_a_bad_sampler_before_recording_anything(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    run_dir = tmp_path / "bad"
    args = ["rl", "--run-dir", str(run_dir), "--student", str(tiny_pair.student_dir),
            "--n-prompts", "4", "--eval-prompts", "2", "--sampler", "trl"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "error: --sampler 'trl' is unknown: choose auto, hf or vllm" in result.output
    assert not (run_dir / "config.json").exists()


def test_plan_charges_both_methods_one_sampling_rate_and_prints_it() -> None:
    from dataclasses import replace

    from distill.plan import PAPER_SCALE, estimate, sampling_rate

    def per_token(a: Any) -> tuple[float, float]:
        _, on, rl_w = estimate(a)
        on_s, rl_s = (next(p for p in w.phases if p.phase == "student.sample") for w in (on, rl_w))
        return on_s.device_hours / on_s.tokens, rl_s.device_hours / rl_s.tokens

    shorter = replace(PAPER_SCALE, rl_response_len=2048)  # RL's own lengths, the same rate
    on_rate, rl_rate = per_token(shorter)
    assert on_rate == pytest.approx(rl_rate, rel=1e-12)
    assert 1 / (on_rate * 3600) == pytest.approx(sampling_rate(shorter))
    stated = replace(shorter, sampling_throughput=1000.0)
    assert per_token(stated) == pytest.approx((1 / 3.6e6, 1 / 3.6e6))
    result = CliRunner().invoke(app, ["plan", "--sampling-throughput", "1000"],
                                env={"COLUMNS": "250"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "student sampling, on-policy and RL alike" in result.output
    assert "1,000 tokens/s per GPU" in result.output
    bad = CliRunner().invoke(app, ["plan", "--sampling-throughput", "-1"])
    assert bad.exit_code == 2 and "--sampling-throughput" in bad.output


def test_onpolicy_and_rl_built_alike_compare_without_a_setup_warning(
    tiny_pair: TinyPair, hf_run: Path, tmp_path: Path
) -> None:
    from distill.onpolicy import train as onpolicy
    from teachers.hf import HFTeacher

    run_dir = tmp_path / "onpolicy"
    cfg = onpolicy.Config(run_dir=run_dir, student=str(tiny_pair.student_dir), steps=1,
                          prompts_per_step=2, max_tokens=6, sampler="hf")  # fmt: skip
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    onpolicy.train(cfg, teacher, embedded_prompts(8, 0, "train"), GpuLedger())
    assert from_run_dir(run_dir).setup == from_run_dir(hf_run).setup
    result = CliRunner().invoke(app, ["report", "compare", str(run_dir), str(hf_run), "--json"])
    assert result.exit_code == 0, result.output
    assert not [w for w in json.loads(result.output)["warnings"] if "differ in" in w]


def test_rl_under_accelerate_launch_records_two_processes(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    """Two CPU processes (gloo, as tests/test_offpolicy_accelerate.py launches them) share RL's
    prompts; the manifest names the layout and the job's ledger merges both ranks."""
    import os
    import signal
    import subprocess
    import sys

    from tests.test_offpolicy_accelerate import free_port

    run_dir = tmp_path / "two"
    distill = Path(sys.executable).parent / "distill"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(free_port()),
        str(distill), "rl", "--run-dir", str(run_dir), "--student", str(tiny_pair.student_dir),
        "--n-prompts", "8", "--eval-prompts", "1", "--steps", "1", "--prompts-per-step", "2",
        "--samples-per-prompt", "2", "--max-tokens", "6", "--sampler", "hf",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    setup = json.loads((run_dir / "manifest.json").read_text())["setup"]["rl"]
    assert setup["processes"] == 2 and setup["layout"] == "2 x cpu, DDP"
    assert from_run_dir(run_dir).setup["processes"] == "2 x cpu, DDP"
    assert GpuLedger.load(run_dir / "ledger.json").devices == 2
