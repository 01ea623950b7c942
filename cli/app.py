"""The typer app every command module registers on."""

import os
import re

import click
import typer
from transformers.utils import logging as hf_logging
from typer.core import TyperGroup

# The CLI draws its own progress: library progress bars and info logs would interleave with it.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


class OneLineErrors(TyperGroup):
    """Usage errors (a bad choice, a number out of a declared range, a missing option) as one
    `error: <problem>: <fix>` line with exit code 2, as every other refusal, not a usage box."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `distill teacher`: the help is the answer
                raise
            click.echo(f"error: {usage_line(e)}", err=True)
            raise click.exceptions.Exit(2) from None


def usage_line(e: click.UsageError) -> str:
    """`<problem>: <fix>` of a click usage error, naming the option as the user typed it."""
    problem = " ".join(e.format_message().split()).rstrip(".")
    command = e.ctx.command_path if e.ctx is not None else "distill"
    param = getattr(e, "param", None)
    if isinstance(param, click.Option) and isinstance(param.type, click.Choice):
        choices = [str(c) for c in param.type.choices]
        got = re.match(r"(?:.*?: )?'(.*)' is not one of", problem)
        value = repr(got.group(1)) if got else "value"
        return (
            f"{param.opts[0]} {value} is unknown: choose {', '.join(choices[:-1])} or {choices[-1]}"
            if len(choices) > 1
            else f"choose {choices[0]}"
        )
    if isinstance(param, click.Parameter) and isinstance(param.type, click.types._NumberRangeBase):
        return f"{problem}: pass a value in that range (see `{command} --help`)"
    return f"{problem}: see `{command} --help`"


app = typer.Typer(
    cls=OneLineErrors,
    name="distill",
    help="Strong-to-weak distillation of LLMs: off-policy, on-policy, and GPU-hour reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
