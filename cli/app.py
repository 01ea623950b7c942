"""The typer app every command module registers on."""

import os

import typer
from transformers.utils import logging as hf_logging

# The CLI draws its own progress: library progress bars and info logs would interleave with it.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

app = typer.Typer(
    name="distill",
    help="Strong-to-weak distillation of LLMs: off-policy, on-policy, and GPU-hour reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
