"""The RL baseline: group-relative advantages, format check, and a real short metered run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import evaluate
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.prompts import Prompt, embedded_prompts
from distill.rl import train as rl
from distill.rl.reward import group_advantages, well_formed
from distill.rundir import read_metrics
from teachers.chat import render_prompt


def test_group_advantages_closed_forms() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(rewards)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(a[1], torch.zeros(4))  # no signal in an all-equal group, and no NaN
    assert torch.allclose(a[2], torch.tensor([-1, -1, -1, 3]) / 3**0.5)
    assert torch.allclose(a.sum(dim=1), torch.zeros(3), atol=1e-6)
    centred = group_advantages(rewards, scale_by_std=False)
    assert torch.allclose(centred[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def test_well_formed_per_mode() -> None:
    assert well_formed("<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}.", "think")
    assert not well_formed("The answer is \\boxed{7}.", "think")  # thinking never closed
    assert not well_formed("<think>\n</think>\n\nseven", "think")
    assert well_formed("The answer is \\boxed{7}.", "no_think")


def short_config(run_dir: Path, student: Path, steps: int) -> rl.Config:
    return rl.Config(
        run_dir=run_dir, student=str(student), steps=steps, prompts_per_step=2,
        samples_per_prompt=2, max_tokens=10, save_every=2, log_every=1, format_weight=0.5,
    )  # fmt: skip


def test_rl_run_is_metered_checkpointed_and_resumes(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    prompts = embedded_prompts(8, 0, "train")
    held = embedded_prompts(2, 0, "eval")
    eval_config = evaluate.Config(prompts=2, max_tokens=10)
    start = time.perf_counter()
    ledger = GpuLedger()
    summary = rl.train(short_config(run_dir, tiny_pair.student_dir, 2), prompts, held,
                       eval_config, ledger)  # fmt: skip
    wall = time.perf_counter() - start
    # the ledger is saved with the last checkpoint: all the run's wall-clock x devices held
    saved = GpuLedger.load(run_dir / "ledger.json")
    assert saved.total_device_hours() * 3600 == pytest.approx(wall * 1, rel=0.02)
    assert {"student.sample", "student.train", "eval"} <= set(saved.phases)
    assert saved.phases["student.sample"].tokens > 0 and saved.phases["student.train"].flops > 0
    assert set(saved.marks) == {"before", "after_rl"}
    evals = json.loads((run_dir / "eval.json").read_text())
    assert list(evals) == ["before", "after_rl"]
    assert set(evals["after_rl"]) == {"accuracy_think", "accuracy_no_think"}
    records = [r for r in read_metrics(run_dir) if r["phase"] == "rl"]
    assert [r["step"] for r in records] == [0, 1]
    assert all(0 <= r["correct"] <= 1 and r["device_hours"] > 0 for r in records)
    model = AutoModelForCausalLM.from_pretrained(summary.checkpoint)
    assert model.config.num_hidden_layers == 2

    # resume: two more steps start at step 2; "before" is not measured again
    rl.train(short_config(run_dir, tiny_pair.student_dir, 4), prompts, held, eval_config,
             GpuLedger.load(run_dir / "ledger.json"))  # fmt: skip
    records = [r for r in read_metrics(run_dir) if r["phase"] == "rl"]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert json.loads((run_dir / "eval.json").read_text())["before"] == evals["before"]
    resumed = GpuLedger.load(run_dir / "ledger.json")
    assert resumed.phases["student.train"].calls == 4
    assert resumed.total_device_hours() > saved.total_device_hours()


def test_rl_refuses_prompts_without_answers(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    bare = [Prompt(id="x", messages=({"role": "user", "content": "hi"},), answer=None)]
    with pytest.raises(DistillError, match="answer"):
        rl.train(short_config(tmp_path, tiny_pair.student_dir, 1), bare, bare,
                 evaluate.Config(prompts=1), GpuLedger())  # fmt: skip


def test_cli_rl_then_report_compare(tiny_pair, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    run_dir = tmp_path / "rl-cli"
    args = ["rl", "--run-dir", str(run_dir), "--student", str(tiny_pair.student_dir),
            "--n-prompts", "4", "--eval-prompts", "2", "--steps", "1", "--prompts-per-step", "2",
            "--samples-per-prompt", "2", "--max-tokens", "8"]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "student.sample" in result.output and "after RL" in result.output
    assert json.loads((run_dir / "eval_set.json").read_text())["prompts"] == 2
    result = runner.invoke(app, ["report", "compare", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.output)["runs"]
    assert run["method"] == "RL (GRPO)" and run["ratio"] == 1.0
    assert run["eval_set"]["prompts"] == 2 and "after_rl" in run["eval"]


def test_the_update_raises_the_probability_of_rewarded_responses(
    tiny_pair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """Reward half of the student's 20 likeliest first tokens: after a few one-token steps it
    puts more mass on them (a flipped policy-gradient sign would lower it)."""
    tok = tiny_pair.tokenizer
    prompts = embedded_prompts(1, 0, "train")
    ids = torch.tensor([render_prompt(tok, prompts[0].messages, "no_think")])

    @torch.no_grad()
    def first_token_probs(model_dir: Path | str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        return model(ids).logits[0, -1, : len(tok)].softmax(-1)  # (V,)

    before = first_token_probs(tiny_pair.student_dir)
    top = before.topk(20).indices  # what the sampler's top-k 20 can draw
    rewarded = top[::2]  # ranks 1, 3, 5, ...
    texts = {tok.decode([int(i)]) for i in rewarded}
    monkeypatch.setattr(rl, "verify", lambda text, answer: text in texts)
    config = rl.Config(
        run_dir=tmp_path, student=str(tiny_pair.student_dir), steps=3, prompts_per_step=1,
        samples_per_prompt=16, max_tokens=1, modes=("no_think",), lr=3e-3, warmup_steps=1,
        save_every=3,
    )  # fmt: skip
    summary = rl.train(config, prompts, prompts, evaluate.Config(prompts=1, max_tokens=1),
                       GpuLedger())  # fmt: skip
    after = first_token_probs(summary.checkpoint)

    def share(p: torch.Tensor) -> float:  # of the mass the sampler draws from
        return float(p[rewarded].sum() / p[top].sum())

    assert share(after) > share(before) + 0.05
