"""One default per option: every command option that sets a Config field defaults to that field's
default, so `distill X` and `distill.X.Config()` mean the same run. `distill run` takes its own
from `pipeline.RECIPE` (the embedded pair's recipe), where the differences are explained."""

from __future__ import annotations

import dataclasses

import pytest
from typer.main import get_command

import cli  # noqa: F401  (registers every command)
from cli.root import app
from distill import evaluate, pipeline
from distill.offpolicy import generate as gen
from distill.offpolicy import train as offpolicy
from distill.onpolicy import train as onpolicy
from distill.rl import train as rl

# command -> the Configs its options build, first match wins
CONFIGS: dict[str, tuple[type, ...]] = {
    "generate": (gen.Config,),
    "offpolicy": (offpolicy.Config,),
    "onpolicy": (onpolicy.Config,),
    "rl": (rl.Config, evaluate.Config),
    "eval": (evaluate.PassConfig,),
    "run": (pipeline.Recipe, onpolicy.Config, offpolicy.Config, gen.Config, evaluate.Config),
}
# options whose CLI value is resolved before it reaches the Config (e.g. --modes auto)
RESOLVED = {"modes", "prompts"}


def defaults(configs: tuple[type, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cli_defaults_are_the_configs(name: str) -> None:
    command = get_command(app).commands[name]  # typer's own (vendored) click Group
    known = defaults(CONFIGS[name])
    checked = 0
    for param in command.params:
        if param.name in known and param.name not in RESOLVED:
            assert param.default == known[param.name], (name, param.name)
            checked += 1
    assert checked >= 4, f"{name}: only {checked} options matched a Config field"
