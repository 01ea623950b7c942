"""`distill plan`: device-hours of off-policy, on-policy distillation and RL before running them.

distill plan --student 8B --teacher 235B-A22B --prompts 4000 --samples 4 --response-len 8192
distill plan --gpu H200 --mfu 0.4 --rl-rollouts 16 --rl-steps 170 --json
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from cli.render import console, user_errors
from cli.root import app
from distill.plan import (
    Assumptions,
    describe,
    estimate,
    held,
    ratio_decomposition,
    sampled_tokens,
    sampling_rate,
)

A = Assumptions


@app.command("plan")
@user_errors
def plan_cmd(
    student: Annotated[str, typer.Option(help="student size, e.g. 8B")] = A.student,
    teacher: Annotated[str, typer.Option(help="teacher size, e.g. 235B-A22B")] = A.teacher,
    prompts: Annotated[int, typer.Option(help="distinct training prompts")] = A.prompts,
    samples: Annotated[int, typer.Option(help="responses per prompt (distillation)")] = A.samples,
    response_len: Annotated[int, typer.Option(help="mean response tokens")] = A.response_len,
    prompt_len: int = A.prompt_len,
    gpu: Annotated[str, typer.Option(help="H100, H200, A100 or L40S")] = A.gpu,
    mfu: Annotated[float, typer.Option(help="MFU of training and prefill")] = A.mfu,
    bandwidth_utilisation: Annotated[
        float, typer.Option(help="share of HBM bandwidth decoding reaches")
    ] = A.bandwidth_utilisation,
    decode_batch: Annotated[
        int, typer.Option(help="sequences per decoding replica")
    ] = A.decode_batch,
    offpolicy_epochs: float = A.offpolicy_epochs,
    onpolicy_passes: float = A.onpolicy_passes,
    rl_steps: int = A.rl_steps,
    rl_prompts_per_step: int = A.rl_prompts_per_step,
    rl_rollouts: Annotated[int, typer.Option(help="G: RL rollouts per prompt")] = A.rl_rollouts,
    rl_response_len: Annotated[
        int, typer.Option(help="RL mean response tokens (0: --response-len)")
    ] = A.rl_response_len,
    rl_logprob_passes: int = A.rl_logprob_passes,
    sampling_throughput: Annotated[
        float,
        typer.Option(help="student tokens/s per GPU, for on-policy and RL alike (0: modelled)"),
    ] = A.sampling_throughput,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    max_staleness: Annotated[
        int, typer.Option(help="1+: also estimate on-policy with steps sampled and scored ahead")
    ] = A.max_staleness,
    student_devices: Annotated[
        int, typer.Option(help="devices the student holds (sampling + training)")
    ] = A.student_devices,
    teacher_devices: Annotated[
        int, typer.Option(help="devices the teacher holds apart (0: one replica)")
    ] = A.teacher_devices,
) -> None:
    """Estimate device-hours per phase of each method, printing every assumption."""
    a = Assumptions(
        student=student,
        teacher=teacher,
        gpu=gpu.upper(),
        prompts=prompts,
        prompt_len=prompt_len,
        samples=samples,
        response_len=response_len,
        offpolicy_epochs=offpolicy_epochs,
        onpolicy_passes=onpolicy_passes,
        rl_steps=rl_steps,
        rl_prompts_per_step=rl_prompts_per_step,
        rl_rollouts=rl_rollouts,
        rl_response_len=rl_response_len,
        rl_logprob_passes=rl_logprob_passes,
        mfu=mfu,
        bandwidth_utilisation=bandwidth_utilisation,
        decode_batch=decode_batch,
        sampling_throughput=sampling_throughput,
        max_staleness=max_staleness,
        student_devices=student_devices,
        teacher_devices=teacher_devices,
    )
    workloads = estimate(a)
    off, on, rl = workloads
    token_ratio, cost_ratio = ratio_decomposition(on, rl)
    if as_json:
        out = {
            "assumptions": asdict(a),
            "workloads": [
                {"method": w.method, "device_hours": w.device_hours,
                 "phases": [asdict(p) for p in w.phases]}
                for w in workloads
            ],
            "rl_over_onpolicy": rl.device_hours / on.device_hours,
            "sampled_token_ratio": token_ratio,
            "per_token_cost_ratio": cost_ratio,
            "sampling_tokens_per_s_per_gpu": sampling_rate(a),
        }  # fmt: skip
        if a.max_staleness:
            out["onpolicy_held"] = {**asdict(held(a, on)), "ratio": held(a, on).ratio}
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table(title="Assumptions")
    for col in ("assumption", "value", "source"):
        table.add_column(col)
    for row in describe(a):
        table.add_row(*row)
    console.print(table)
    est = Table(title=f"Estimated {a.gpu} GPU-hours")
    for col in ("method", "phase", "model", "tokens", "PFLOPs", "bound", "replica", "GPU-hours"):
        est.add_column(col, justify="left" if col in ("method", "phase", "model") else "right")
    for w in workloads:
        for p in w.phases:
            est.add_row(w.method, p.phase, p.model, f"{p.tokens:.3g}", f"{p.flops / 1e15:,.0f}",
                        p.bound, str(p.devices), f"{p.device_hours:,.0f}")  # fmt: skip
        est.add_row(f"[bold]{w.method}", "[bold]total", "", "", "", "", "",
                    f"[bold]{w.device_hours:,.0f}")  # fmt: skip
    console.print(est)
    console.print(
        f"on-policy : RL = 1 : {rl.device_hours / on.device_hours:.1f}  "
        f"(RL samples {token_ratio:.1f}x the tokens at {cost_ratio:.2f}x the cost per sampled "
        f"token; off-policy + on-policy : RL = 1 : "
        f"{rl.device_hours / (off.device_hours + on.device_hours):.1f}); "
        f"sampled tokens: on-policy {sampled_tokens(on):.3g}, RL {sampled_tokens(rl):.3g}, "
        f"both at {sampling_rate(a):,.0f} tokens/s per GPU"
    )
    if a.max_staleness:
        h = held(a, on)
        console.print(
            f"on-policy, devices held (student {h.student_devices}, teacher {h.teacher_devices} "
            f"apart): in series {h.series_hours:,.0f} GPU-hours; --max-staleness "
            f"{a.max_staleness} {h.overlapped_hours:,.0f} ({h.ratio:.2f}x; busy: student "
            f"{h.student_busy:.0%}, teacher {h.teacher_busy:.0%}). Assumed: a phase's wall time "
            "is its GPU-hours over its group's devices; the student's devices sample and train, "
            "the teacher's score, a step's chain spans S + 1 steps: a step lasts max(sample + "
            "train, score, (sample + score + train) / (S + 1)); the pipeline's fill and the "
            "quality cost of staleness are left out."
        )
