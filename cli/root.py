"""The root typer app every command module registers on (`cli.commands` imports them all)."""

import os
import re

import typer
from transformers.utils import logging as hf_logging
from typer._click.core import Context
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

# The CLI draws its own progress: library progress bars and info logs would interleave with it.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


class OneLineErrors(TyperGroup):
    """Usage errors (a bad choice, a number out of a declared range, a missing option) as one
    `error: <problem>: <fix>` line with exit code 2, as every other refusal, not a usage box."""

    def invoke(self, ctx: Context) -> object:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            if isinstance(e, NoArgsIsHelpError):  # `distill teacher`: the help is the answer
                raise
            typer.echo(f"error: {usage_line(e)}", err=True)
            raise typer.Exit(2) from None


CHOICE = re.compile(
    r"Invalid value for '(?P<opt>[^']+)': (?:Value error, )?"
    r"(?P<value>'.*') is not one of (?P<of>.*)"
)


def usage_line(e: UsageError) -> str:
    """`<problem>: <fix>` of a typer usage error, naming the option as the user typed it."""
    problem = " ".join(e.format_message().split()).rstrip(".")
    command = e.ctx.command_path if e.ctx is not None else "distill"
    choice = CHOICE.match(problem)
    if choice:
        names = [c.strip().strip("'") for c in choice["of"].split(",")]
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        return f"{choice['opt']} {choice['value']} is unknown: choose {listed}"
    if (
        " is not in the range " in problem
        or "Input should be greater" in problem
        or ("Input should be less" in problem)
    ):
        return f"{problem}: pass a value in that range"
    return f"{problem}: see `{command} --help`"


app = typer.Typer(
    cls=OneLineErrors,
    name="distill",
    help="Strong-to-weak distillation of LLMs: off-policy, on-policy, and GPU-hour reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
