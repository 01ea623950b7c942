"""Every config validates itself from its field types: the one place a value is checked.

A Config dataclass calls `check_fields(self)` in `__post_init__`, so no config that cannot mean
anything is ever built, by the CLI or by a library caller. What is checked comes from the types:

    steps: Annotated[int, Range(lo=1)] = 100     # ranges: declared once, on the field
    lmbda: Annotated[float, FRACTION] = 0.0
    divergence: Divergence = "reverse_kl"       # Literal: the choices are the type's values
    modes: tuple[Mode, ...] = MODES               # every element one of the Literal's values

and, with nothing declared: every float is finite (NaN and infinities are refused), every int
lies in [0, 2**63) (counts, sizes, seeds: negative never means anything; beyond int64 torch
overflows), every str is non-empty. A combination of fields (`--thinking-budget` below
`--max-tokens`) is checked in the config's own `__post_init__`, after `check_fields`.

Messages name the command-line flag (`--field-name`), the value and the fix, as the CLI prints
them: `error: --lr -0.001 must be >= 0: pass a value in that range`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from distill.errors import DistillError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """Bounds of a number field; `lo_open`/`hi_open` exclude the bound itself."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def describe(self) -> str:
        """'lie in [0, 1)', 'be >= 1', 'be < 2': what a value must do, after 'must'."""
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"lie in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"
        if self.lo is not None:
            return f"be {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"be {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return "be a number"


def _fmt(x: float) -> str:
    if x == INT64_MAX:
        return "2**63 - 1"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Flag:
    """The flag of a field named otherwise (`budgets`: --thinking-budget)."""

    name: str


POSITIVE = Range(lo=0, lo_open=True)
AT_LEAST_1 = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1)
ANY_INT = Range(lo=-INT64_MAX - 1, hi=INT64_MAX)  # opt out of the default [0, 2**63)
DEFAULT_INT = Range(lo=0, hi=INT64_MAX)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_text(values: tuple[Any, ...]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_fields(config: Any) -> None:
    """Check every field of dataclass `config` against its type (see the module docstring)."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        hint = hints[field.name]
        extras = get_args(_strip_none(hint))[1:] if _annotated(_strip_none(hint)) else ()
        name = next((e.name for e in extras if isinstance(e, Flag)), flag(field.name))
        check_value(name, getattr(config, field.name), hint)


def check_value(name: str, value: Any, hint: Any) -> None:
    if _optional(hint) and value is None:
        return
    hint = _strip_none(hint)
    declared: Range | None = None
    if _annotated(hint):
        hint, *extras = get_args(hint)
        declared = next((e for e in extras if isinstance(e, Range)), None)
    if get_origin(hint) is Literal:
        _choice(name, value, get_args(hint))
    elif get_origin(hint) is tuple and get_args(hint) and get_origin(get_args(hint)[0]) is Literal:
        for v in value:
            _choice(name, v, get_args(get_args(hint)[0]))
        if not value:
            raise DistillError(f"{name} is empty: pass at least one value")
    elif hint is bool:
        return
    elif hint is int or hint is float:
        _number(name, value, declared or (DEFAULT_INT if hint is int else None))
    elif get_origin(hint) is tuple and get_args(hint)[:1] in ((int,), (float,)):
        for v in value:
            _number(name, v, declared or DEFAULT_INT)
    elif hint is str and not str(value).strip():
        raise DistillError(f"{name} is empty: pass a value")
    elif hint is Path and not str(value).strip():
        raise DistillError(f"{name} is empty: pass a path")


def check_budget(thinking_budget: int | None, max_tokens: int) -> None:
    """A budget at or past the length limit can never be reached: the flags contradict."""
    if thinking_budget is not None and thinking_budget >= max_tokens:
        raise DistillError(
            f"--thinking-budget {thinking_budget} is not below --max-tokens {max_tokens}: the "
            "budget could never apply; lower --thinking-budget or raise --max-tokens"
        )


def _choice(name: str, value: Any, values: tuple[Any, ...]) -> None:
    if value not in values:
        raise DistillError(f"{name} {value!r} is unknown: choose {choices_text(values)}")


def _number(name: str, value: Any, declared: Range | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DistillError(f"{name} {value!r} is not a number: pass a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise DistillError(f"{name} {value} is not finite: pass a finite number")
    if declared is not None and not declared.holds(value):
        shown = value if isinstance(value, int) else f"{value:g}"
        raise DistillError(f"{name} {shown} must {declared.describe()}: pass a value in that range")


def _annotated(hint: Any) -> bool:
    return get_origin(hint) is typing.Annotated


def _optional(hint: Any) -> bool:
    return type(None) in get_args(hint) and get_origin(hint) in (typing.Union, _UnionType)


def _strip_none(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, _UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


_UnionType = type(int | None)
