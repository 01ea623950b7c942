"""The typer app every command module registers on."""

import typer

app = typer.Typer(
    name="distill",
    help="Strong-to-weak distillation of LLMs: off-policy, on-policy, and GPU-hour reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
