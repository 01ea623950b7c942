"""Steps ahead: later steps' scored rollouts, produced while the student trains on earlier ones.

`Ahead(sample, score, sampler, model, start=, steps=, max_staleness=S, sync_every=)` is the
loop's source of scored rollouts; the loop calls `take(step)` before it trains a step and
`publish(version)` after each optimizer step (version v = the weights after v optimizer steps,
the ones step v trains). `sample(step, version, sampler)` draws a step's rollouts,
`score(batch)` has the teacher score them.

- `S = 0`: no thread. `take(step)` syncs the sampler (every `sync_every` steps) and calls
  `score(sample(step, step, sampler))` in the caller's thread: exactly the synchronous loop.
- `S >= 1`: two background threads, a sampler and a scorer (CPU threads: torch releases the GIL
  inside its kernels, so sampling, scoring and training overlap). The sampler thread draws step
  k from weight version `sampled_version(k) = max(k - S, start)` as soon as the trainer has
  published it and hands it to the scorer thread, which scores step k while step k + 1 is
  sampled; the queue therefore never holds more than S steps. The sampler draws from its own
  frozen copy of the student (`sampling.on_copy`: an HF sampler is rebuilt on it; a vLLM engine
  is fed the copy's weights), refreshed from a snapshot of the trainable parameters the trainer
  takes at each version the bound requires, never from the training model mid-update. Every
  rollout carries the version that sampled it; `take` refuses a sequence older than S versions.

The version of every step is a function of (step, start, S), never of timing: a run is
deterministic whatever the threads' speeds. Resume: the queue is discarded at a kill (nothing in
it was trained or checkpointed) and rebuilt from the checkpoint's weights, so the first S steps
after a resume sample fresher weights (staleness < S) than the uninterrupted run did; the slots
and sampling seeds are functions of (seed, step), so no prompt is trained twice or skipped.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType

import torch
from transformers import PreTrainedModel

from distill import sampling
from distill.onpolicy.metrics import Lengths
from distill.onpolicy.rollout import Rollout
from distill.onpolicy.schedule import Slot
from students.sample import Sampler


@dataclass(frozen=True, kw_only=True)
class Produced:
    """One step's scored rollouts and what the step's metrics read about producing them."""

    step: int
    slots: list[Slot]
    rollouts: list[Rollout]  # scored; each with the weight version that sampled it
    lengths: Lengths  # before a truncation "drop"
    n_sampled: int  # tokens the student sampled
    n_scored: int  # tokens the teacher scored
    sample_seconds: float
    score_seconds: float
    queue_depth: int = 0  # later steps sampled (scored or not) and waiting when this was taken


Sample = Callable[[int, int, Sampler], Produced]  # (step, version, sampler) -> rollouts, unscored
Score = Callable[[Produced], Produced]  # the same batch, scored by the teacher


def sampled_version(step: int, start: int, max_staleness: int) -> int:
    """The weight version that samples `step`: S versions behind, never before the run's start."""
    return max(step - max_staleness, start)


def staleness(batch: Produced) -> list[int]:
    """Versions between each on-policy sequence's sampler and the weights that train on it."""
    return [batch.step - r.version for r in batch.rollouts if r.on_policy]


def metrics(batch: Produced) -> dict[str, float]:
    ages = staleness(batch) or [0]
    return {
        "staleness_mean": sum(ages) / len(ages),
        "staleness_max": float(max(ages)),
        "queue_depth": float(batch.queue_depth),
    }


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters training changes (all, or LoRA's adapters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Ahead:
    """The loop's source of scored rollouts, `max_staleness` steps ahead at most (see above)."""

    def __init__(
        self,
        sample: Sample,
        score: Score,
        sampler: Sampler,
        model: PreTrainedModel,
        *,
        start: int,
        steps: int,
        max_staleness: int,
        sync_every: int = 1,
    ) -> None:
        self.sample, self.score, self.model = sample, score, model
        self.start, self.steps, self.sync_every = start, steps, sync_every
        self.bound = max_staleness
        self.sampler = sampler
        self.sampled: dict[int, Produced] = {}  # waiting for the scorer
        self.ready: dict[int, Produced] = {}  # scored, waiting for the trainer
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.published = start  # the latest version the trainer has made
        self.error: BaseException | None = None
        self.synced: dict[str, float] = {}  # the latest weight sync's bytes and seconds (vLLM)
        self.stopping = False
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        if max_staleness > 0:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)  # version `start`
            self.sampler = sampling.on_copy(sampler, self.copy)
            self._sync(self.copy)  # a reused engine held any weights
            for work in (self._sample_ahead, self._score_ahead):
                thread = threading.Thread(target=self._guard, args=(work,), name="distill-ahead")
                thread.daemon = True
                thread.start()
                self.threads.append(thread)

    def take(self, step: int) -> Produced:
        """Step `step`'s scored rollouts: produced now (S = 0) or waited for (S >= 1)."""
        if not self.threads:
            if sampling.sync_due(step, self.start, self.sync_every):
                self._sync(self.model)
            return self.score(self.sample(step, step, self.sampler))
        with self.cond:
            self.cond.wait_for(lambda: step in self.ready or self.error is not None)
            if self.error is not None:
                raise self.error
            batch = self.ready.pop(step)
            batch = replace(batch, queue_depth=len(self.ready) + len(self.sampled))
        if max(staleness(batch), default=0) > self.bound:  # the bound, held where it is consumed
            raise RuntimeError(f"step {step} got sequences older than {self.bound} versions")
        return batch

    def publish(self, version: int) -> None:
        """The trainer has made weight version `version`: snapshot it if a later step samples it."""
        if not self.threads:
            return
        needed = version + self.bound < self.steps  # step version + S samples it
        snapshot = trainable_snapshot(self.model) if needed else None
        with self.cond:
            if snapshot is not None:
                self.snapshots[version] = snapshot
            self.published = version
            self.cond.notify_all()

    def close(self) -> None:
        """Stop the threads after the step each is on (a kill or the end), drop the queue."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join()
        self.sampled.clear()
        self.ready.clear()
        self.snapshots.clear()

    def __enter__(self) -> Ahead:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as e:  # re-raised by `take` in the trainer's thread
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _sample_ahead(self) -> None:
        loaded = self.start
        for step in range(self.start, self.steps):
            version = sampled_version(step, self.start, self.bound)
            with self.cond:
                self.cond.wait_for(lambda v=version: self.published >= v or self.stopping)
                if self.stopping:
                    return
                snapshot = self.snapshots.pop(version, None)
                for old in [v for v in self.snapshots if v < version]:
                    del self.snapshots[old]
            if version != loaded:
                assert snapshot is not None, f"no snapshot of version {version}"
                self._load(snapshot)
                loaded = version
            batch = self.sample(step, version, self.sampler)
            with self.cond:
                self.sampled[step] = batch
                self.cond.notify_all()

    def _score_ahead(self) -> None:
        for step in range(self.start, self.steps):
            with self.cond:
                self.cond.wait_for(lambda k=step: k in self.sampled or self.stopping)
                if self.stopping:
                    return
                batch = self.sampled[step]
            scored = self.score(batch)
            with self.cond:
                del self.sampled[step]
                self.ready[step] = scored
                self.cond.notify_all()

    def _load(self, snapshot: dict[str, torch.Tensor]) -> None:
        params = dict(self.copy.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
        self._sync(self.copy)

    def _sync(self, model: torch.nn.Module) -> None:
        stats = self.sampler.sync(model)  # type: ignore[arg-type]
        if stats is not None:  # an engine's sync (the HF sampler samples the model itself)
            self.synced = stats.metrics()
