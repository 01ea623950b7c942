"""Every random stream of a run is seeded from the run's `--seed` through `derive_seed`.

A stream is a step, an epoch, a process rank or a generated row, each made into a small
non-negative offset by its owner (e.g. `step * 2 + (mode == "think")` for the student's sampling
calls). Offsets stay below the multiplier 1,000,003 (a prime) in any run of practical length, so
two runs with different seeds never share a stream, and a stream is a pure function of
(seed, offset): a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

MULTIPLIER = 1_000_003


def derive_seed(seed: int, offset: int) -> int:
    """The seed of one stream of the run seeded `seed`."""
    return seed * MULTIPLIER + offset
