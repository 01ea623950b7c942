"""`distill eval`: pass@1 and pass@k per mode, and the thinking-budget curve, written into the run.

distill eval --run-dir runs/default                                   # latest stage, both modes
distill eval --run-dir runs/default --stage before --n 8 --k 1,4,8
distill eval --run-dir runs/default --thinking-budget 8,16,32,64 --plot curve.png
distill eval --run-dir runs/x --model 8B --prompts gsm8k.jsonl --sampler vllm --n 64 --k 1,64

Results go to RUN_DIR/eval/<name>.json (name: the stage, or --name) and `distill report show`
prints them. A rerun with the same model, prompts and settings reads the stored result back.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from cli import dryrun
from cli.render import config_table, console, user_errors
from cli.resolve import ModesOpt, PromptsOpt, RunDir, SoftSwitchOpt, resolve_modes
from cli.root import app
from distill import checkpoint, evaluate
from distill.accounting import GpuLedger
from distill.answers import write_responses
from distill.errors import DistillError
from distill.prompts import EMBEDDED
from distill.rundir import read_json
from students.load import load_student, resolve_student
from students.sample import HFSampler
from teachers.chat import GenerateFn

Stage = Literal["latest", "before", "after_offpolicy", "after_onpolicy"]
STAGE_CHOICES: tuple[Stage, ...] = ("latest", "before", "after_offpolicy", "after_onpolicy")
EvalSampler = Literal["hf", "vllm"]


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DistillError(
            f"{option} takes comma-separated integers, e.g. 1,4,8; got {text!r}"
        ) from None
    if not values:
        raise DistillError(f"{option} is empty: pass comma-separated integers, e.g. 1,4,8")
    return values


def stage_model(run_dir: Path, stage: str) -> tuple[str, str]:
    """(stage name, model folder) of a pipeline stage in `run_dir`; 'latest' is the newest one."""
    if stage not in STAGE_CHOICES:
        raise DistillError(f"--stage {stage!r} is not one of {', '.join(STAGE_CHOICES)}")
    for name, phase in (("after_onpolicy", "onpolicy"), ("after_offpolicy", "offpolicy")):
        if stage in (name, "latest"):
            found = checkpoint.latest(run_dir / phase / "checkpoint")
            if found is not None:
                return name, str(found)
            if stage == name:
                raise DistillError(
                    f"{run_dir} has no {phase} checkpoint yet: run `distill {phase}` first, or "
                    "choose another --stage"
                )
    configs = read_json(run_dir / "config.json", default={})
    student = configs.get("offpolicy", {}).get("student")
    if student is None:
        raise DistillError(
            f"{run_dir} records no student (config.json has no offpolicy phase): pass --model"
        )
    return "before", str(student)


def make_generate(
    sampler: str, path: str, max_model_len: int, seed: int
) -> tuple[GenerateFn, PreTrainedTokenizerBase, int]:
    """(generate function, tokenizer, parameter count) of the student on the chosen backend."""
    model, tokenizer = load_student(path)
    n_params = sum(p.numel() for p in model.parameters())
    if sampler == "hf":
        hf = HFSampler(
            model.eval(),
            eos_id=evaluate.token_id(tokenizer, "eos_token_id"),
            pad_id=evaluate.token_id(tokenizer, "pad_token_id"),
            vocab_size=len(tokenizer),
        )
        return hf.generate, tokenizer, n_params
    if sampler == "vllm":
        from students.vllm_sampler import VLLMSampler  # lazy: vllm is an optional extra

        del model  # the engine loads its own copy
        try:
            engine = VLLMSampler.from_pretrained(path, max_model_len=max_model_len, seed=seed)
        except ImportError as e:
            raise DistillError(str(e)) from None
        return engine.generate, tokenizer, n_params
    raise DistillError(f"--sampler {sampler!r} is not one of hf, vllm")


def pass_table(name: str, modes: dict[str, dict[str, Any]]) -> Table:
    ks = sorted({k for v in modes.values() for k in v if k.startswith("pass@")}, key=_k)
    table = Table(title=f"pass@k by mode: {name}")
    for col in ("mode", *ks, "mean tokens", "truncated"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, v in modes.items():
        table.add_row(
            mode, *(f"{v[k]:.3f}" for k in ks), f"{v['mean_tokens']:.1f}", f"{v['truncated']:.2f}"
        )
    return table


def curve_table(name: str, curve: list[dict[str, Any]], unbudgeted: dict[str, Any] | None) -> Table:
    rows = [*curve, *([{"budget": None, **unbudgeted}] if unbudgeted else [])]
    ks = sorted({k for r in rows for k in r if k.startswith("pass@")}, key=_k)
    table = Table(title=f"Thinking budget (thinking mode): {name}")
    for col in ("budget", *ks, "thinking tokens", "truncated"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            "none" if r["budget"] is None else str(r["budget"]),
            *(f"{r[k]:.3f}" for k in ks),
            f"{r['mean_thinking_tokens']:.1f}",
            f"{r['truncated']:.2f}",
        )
    return table


def plot_curve(
    path: Path, name: str, curve: list[dict[str, Any]], unbudgeted: dict[str, Any] | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = [r["budget"] for r in curve]
    for k in sorted({k for r in curve for k in r if k.startswith("pass@")}, key=_k):
        ax.plot(budgets, [r[k] for r in curve], marker="o", label=k)
    if unbudgeted is not None:
        ax.axhline(unbudgeted["pass@1"], linestyle="--", color="gray", label="pass@1, no budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Accuracy against thinking budget: {name}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_result(name: str, result: dict[str, Any]) -> None:
    console.print(pass_table(name, result["modes"]))
    if result.get("budget_curve"):
        console.print(curve_table(name, result["budget_curve"], result["modes"].get("think")))


def render_eval_dir(run_dir: Path) -> None:
    """Every result of `distill eval` in the run, for `distill report show`."""
    for path in sorted((run_dir / "eval").glob("*.json")):
        render_result(path.stem, read_json(path))


def _k(key: str) -> int:
    return int(key.split("@")[1])


def dry_eval(
    config: evaluate.PassConfig,
    path: str,
    sampler: str,
    n_prompts: int,
    stored: bool,
    run_dir: Path,
    name: str,
) -> None:
    """`distill eval --dry-run`: the model's tokenizer and the sampler, nothing generated."""
    console.print(config_table(f"eval {name}: {path}", config))
    if stored:
        return dryrun.finish([f"print the stored result {evaluate.result_path(run_dir, name)}"])
    dryrun.tokenizer(path, "model")
    if sampler == "vllm" and importlib.util.find_spec("vllm") is None:
        raise DistillError(
            "--sampler vllm needs vLLM: pip install 'distill[vllm]', or --sampler hf"
        )
    budgets = f" and the budget curve at {list(config.budgets)}" if config.budgets else ""
    dryrun.finish([
        f"sample {config.n} responses per prompt and mode ({', '.join(config.modes)}) for "
        f"{n_prompts} prompts with {path} ({sampler}): pass@{list(config.ks)}{budgets}",
        f"write {evaluate.result_path(run_dir, name)}",
    ])  # fmt: skip


@app.command("eval")
@user_errors
def eval_command(
    run_dir: RunDir,
    model: Annotated[
        str | None, typer.Option(help="model folder, Qwen3 size or hub id (default: --stage)")
    ] = None,
    stage: Annotated[Stage, typer.Option(help=", ".join(STAGE_CHOICES))] = "latest",
    prompts: PromptsOpt = EMBEDDED,
    prompt_column: str = "prompt",
    answer_column: Annotated[str, typer.Option(help="column of reference answers")] = "answer",
    n_prompts: Annotated[int, typer.Option(help="prompts to evaluate")] = 32,
    modes: ModesOpt = "auto",
    soft_switch: SoftSwitchOpt = False,
    n: Annotated[int, typer.Option(help="samples per prompt and mode")] = evaluate.PassConfig.n,
    k: Annotated[str, typer.Option(help="pass@k for these k (each <= n)")] = "1,4,8",
    max_tokens: Annotated[int, typer.Option(help="response length limit")] = (
        evaluate.PassConfig.max_tokens
    ),
    thinking_budget: Annotated[
        str | None, typer.Option(help="budgets for the curve, e.g. 64,128,256")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="write the budget curve as a PNG")] = None,
    sampler: Annotated[EvalSampler, typer.Option(help="hf or vllm")] = "hf",
    name: Annotated[str | None, typer.Option(help="result name (default: the stage)")] = None,
    seed: int = evaluate.PassConfig.seed,
    force: Annotated[bool, typer.Option(help="replace a result with other settings")] = False,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    """pass@1 / pass@k per mode on verifiable prompts, and accuracy against thinking budget."""
    run_dir = dryrun.run_dir_for(run_dir)
    if plot is not None and thinking_budget is None:
        raise DistillError("--plot draws the budget curve: pass --thinking-budget too")
    config = evaluate.PassConfig(
        n=n,
        ks=parse_ints(k, "--k"),
        soft_switch=soft_switch,
        max_tokens=max_tokens,
        budgets=parse_ints(thinking_budget, "--thinking-budget") if thinking_budget else (),
        seed=seed,
    )
    if model is not None:
        stage_name, path = Path(model).name or model, resolve_student(model)
    else:
        stage_name, path = stage_model(run_dir, stage)
    # --modes auto means what the model's chat template supports: known once the model is
    modes_of = resolve_modes(
        modes,
        path if Path(path).is_dir() else None,
        soft_switch=soft_switch,
        thinking_budget=thinking_budget is not None,
    )
    config = dataclasses.replace(config, modes=modes_of)
    result_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", stage_name)
    items = evaluate.eval_prompts(prompts, n_prompts, seed + 1, prompt_column, answer_column)
    header = {
        "model": path, "prompts": prompts, "n_prompts": len(items), "sampler": sampler,
        "config": config,
    }  # fmt: skip
    result = evaluate.stored_result(run_dir, result_name, header, force)
    if dry_run:
        return dry_eval(config, path, sampler, len(items), result is not None, run_dir, result_name)
    if result is not None:
        console.print(f"[dim]{evaluate.result_path(run_dir, result_name)} is up to date[/]")
    else:
        console.print(config_table(f"eval {result_name}: {path}", config))
        run_dir.mkdir(parents=True, exist_ok=True)
        ledger = GpuLedger.load_or_new(run_dir / "ledger.json")
        budget_room = max(config.budgets, default=0) + 64  # the stop sentence and its answer
        generate, tokenizer, n_params = make_generate(
            sampler, path, max_tokens + budget_room + 2048, seed
        )
        audit: list[dict[str, object]] = []  # every judged response, for RUN_DIR/eval/*.parquet
        measured = {
            "modes": evaluate.pass_at(
                generate, tokenizer, items, config, ledger, n_params, audit=audit
            ),
            "budget_curve": evaluate.budget_curve(
                generate, tokenizer, items, config, ledger, n_params, audit=audit
            ),
        }
        ledger.save(run_dir / "ledger.json")
        responses = write_responses(
            evaluate.result_path(run_dir, result_name).with_suffix(".responses.parquet"), audit
        )
        console.print(f"[dim]{len(audit)} judged responses written to {responses}[/]")
        written = evaluate.save_result(run_dir, result_name, header, measured)
        result = read_json(written)
        console.print(f"[dim]written {written}[/]")
    render_result(result_name, result)
    if plot is not None:
        plot_curve(plot, result_name, result["budget_curve"], result["modes"].get("think"))
        console.print(f"[dim]plot written to {plot}[/]")
