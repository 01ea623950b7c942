"""`distill students`: the Qwen3 student sizes, their shapes, and what a training step needs.

distill students                              # the table, activations for 4,096 tokens
distill students --tokens 16384 --lora-rank 16
distill students --model ./my-student --size 8B   # check a folder against a size (exit 2 if not)
distill students prune --from ./teacher --layers 8 --out ./student   # a depth-pruned copy
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.render import console, user_errors
from students.load import check_architecture, load_config, resolve_student
from students.presets import (
    PRESETS,
    Optimizer,
    Precision,
    activation_bytes,
    count_params,
    identify,
    lora_params,
    preset_config,
    step_memory,
)

# (precision, optimizer, LoRA?) columns of the memory table: the common set-ups.
SETUPS: tuple[tuple[Precision, Optimizer, bool], ...] = (
    ("bf16-mixed", "adamw", False),
    ("bf16", "adamw", False),
    ("bf16-mixed", "adamw8bit", False),
    ("fp32", "adamw", False),
    ("bf16-mixed", "adamw", True),
)
GIB = 2**30


def memory_table(tokens: int, lora_rank: int) -> Table:
    table = Table(
        title=f"Qwen3 students: GiB per training step on one device, unsharded "
        f"(activations: {tokens:,} tokens, per-layer recomputation)"
    )
    for col in ("size", "layers", "heads\nQ/KV", "hidden", "params", "active", "tied"):
        table.add_column(col, justify="left" if col == "size" else "right")
    for precision, optimizer, lora in SETUPS:
        label = f"{precision}\n{optimizer}" + (f"\nLoRA r{lora_rank}" if lora else "")
        table.add_column(label, justify="right")
    for preset in PRESETS.values():
        config = preset_config(preset)
        counts = count_params(config)
        cells = []
        for precision, optimizer, lora in SETUPS:
            # LoRA on the attention projections only for MoE (experts are fused 3-D tensors).
            targets = ("q_proj", "k_proj", "v_proj", "o_proj")
            if not preset.is_moe:
                targets += ("gate_proj", "up_proj", "down_proj")
            trainable = lora_params(config, lora_rank, targets) if lora else None
            memory = step_memory(
                counts,
                precision,
                optimizer,
                trainable=trainable,
                activations=activation_bytes(config, tokens, precision),
            )
            cells.append(f"{memory.total / GIB:,.1f}")
        table.add_row(
            preset.size,
            str(preset.layers),
            f"{preset.heads}/{preset.kv_heads}",
            str(preset.hidden),
            f"{counts.total / 1e9:.2f}B",
            f"{counts.active / 1e9:.2f}B",
            "yes" if preset.tie_embeddings else "no",
            *cells,
        )
    return table


students_app = typer.Typer(help="Qwen3 student sizes, and students made from a model's layers.")


@students_app.callback(invoke_without_command=True)
@user_errors
def students(
    ctx: typer.Context,
    tokens: Annotated[int, typer.Option(help="tokens per micro-batch, for activations")] = 4096,
    lora_rank: Annotated[int, typer.Option(help="rank of the LoRA column")] = 16,
    model: Annotated[str | None, typer.Option(help="a model folder to check")] = None,
    size: Annotated[str | None, typer.Option(help="the Qwen3 size --model must have")] = None,
) -> None:
    """Qwen3 student sizes: layers, heads, parameters, memory per precision and optimizer."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        console.print(memory_table(tokens, lora_rank))
        console.print(
            "hub ids: Qwen/Qwen3-<size> (post-trained), Qwen/Qwen3-<size>-Base; "
            "every size shares one tokenizer (151,669 ids on a 151,936-row head)",
            highlight=False,
        )
        return
    source = resolve_student(model)
    if size is not None:
        check_architecture(source, size)
        console.print(f"{source} has the architecture of Qwen3-{size}", highlight=False)
        return
    found = identify(load_config(source))
    console.print(
        f"{source}: " + (f"Qwen3-{found.size}" if found else "not one of the Qwen3 sizes"),
        highlight=False,
    )


@students_app.command("prune")
@user_errors
def prune_cmd(
    source: Annotated[str, typer.Option("--from", help="the model folder to take layers from")],
    layers: Annotated[int, typer.Option(help="decoder layers the copy keeps")],
    out: Annotated[str, typer.Option(help="where the pruned model folder is written")],
) -> None:
    """Write a depth-pruned copy of a model: its first LAYERS-1 layers and its last one."""
    from students.prune import prune

    written = prune(source, layers, out)
    console.print(f"{layers}-layer copy of {source} written to {written}", highlight=False)
