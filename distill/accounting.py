"""GpuLedger: device-hours, tokens, FLOPs and MFU per phase, so runs compare with RL by one meter.

Device-hours = wall-clock seconds x devices *held* / 3600. Every second from the ledger's start
(or its reload on resume) to its last `save` is charged to exactly one owner, so the ledger's
total equals wall-clock x devices held, whatever the loops meter:

- inside `with ledger.phase(name, devices=d)`: `d` devices to `name`;
- outside any phase (loading models, saving checkpoints, Python between phases): every held
  device to `waiting`;
- a remote teacher declared with `teacher_devices=n` (`--teacher-gpus n`) is held for the whole
  run: its `n` devices go to the `teacher.*` phase while it works and to `teacher.reserved` while
  the student works; the student's devices wait (`waiting`) while the remote teacher works.

Nested phases charge the innermost one. Phases may overlap in different threads (asynchronous
on-policy steps, distill/onpolicy/ahead.py): each *device group* (the student's devices; a remote
teacher's) is charged once per second, to the innermost phase of every thread working on it,
split evenly between them when several do, so nothing is double-counted. A group with no phase
working is idle: the student's devices `waiting`, the remote teacher's `teacher.reserved` while
the student works (`waiting` when nobody does). `busy_fractions` says what share of the wall-clock
each group worked. On a CPU-only machine the device is the CPU and reports
say "CPU device-hours", never GPU-hours; MFU is only reported against a known accelerator peak.

FLOPs (docs/facts.md; docs/accounting.md derives them): a forward pass costs 2·N per token for the N
parameters that take part in matrix products, plus attention 4·L·d_attn·c per token attending to
c positions; training costs 3x forward (forward, input gradient, weight gradient).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from distill.errors import DistillError
from distill.rundir import atomic_write_json, read_json

PHASES = (
    "teacher.generate",
    "teacher.score",
    "student.sample",
    "student.train",
    "eval",
    "waiting",
    "teacher.reserved",
)
WAITING, RESERVED = "waiting", "teacher.reserved"
STUDENT, TEACHER = "student", "teacher"  # the device groups a run holds

# Dense bf16 peak FLOP/s and HBM bandwidth (B/s) by accelerator name, matched in the CUDA name.
# H100/H200 SXM: docs/facts.md; A100 SXM 80GB, L40S: vendor data sheets (dense, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.039e12, "L40S": 0.864e12}


def device_kind() -> str:
    """'cuda:<name>' on a GPU, else 'cpu'."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def accelerator_name(device: str) -> str | None:
    """'H100' for 'cuda:NVIDIA H100 80GB HBM3' (or plain 'H100'); None for the CPU or unknown."""
    upper = device.upper()
    return next((name for name in PEAK_FLOPS if name in upper), None)


def peak_flops(device: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device, None where no peak is tabled (CPU, unknown GPU)."""
    name = accelerator_name(device)
    return PEAK_FLOPS[name] if name else None


def unit(device: str) -> str:
    return (
        "GPU-hours" if device.startswith("cuda") or accelerator_name(device) else "CPU device-hours"
    )


def forward_flops(
    n_params: int, tokens: int, *, layers: int = 0, attn_width: int = 0, context: float = 0.0
) -> float:
    """FLOPs of a forward pass over `tokens` tokens.

    `n_params` counts the parameters used in matrix products: with an untied head, leave out the
    input embedding (a lookup, no FLOPs). Each costs a multiply and an add per token: 2·N. The
    attention scores (QKᵀ) and the weighted sum (AV) add 2·2·L·d_attn·c per token, where
    d_attn = heads x head_dim and c is the mean number of positions a token attends to (T/2 for
    a causal prefill of T tokens, the current length when decoding).
    """
    return 2.0 * n_params * tokens + 4.0 * layers * attn_width * context * tokens


def train_flops(
    n_params: int,
    tokens: int,
    *,
    layers: int = 0,
    attn_width: int = 0,
    context: float = 0.0,
    trainable: int | None = None,
) -> float:
    """Forward + backward. The backward costs a forward for the input gradients (2·N per token:
    every layer passes its gradient down) and one for the weight gradients, but the latter only
    for the `trainable` matrix parameters (default all N: 6·N per token in all). With LoRA the
    base weights are frozen, so training costs ≈ 4·N + 2·N_adapters per token, not 6·N.
    Attention has no weights: its backward is twice its forward either way.
    """
    trainable = n_params if trainable is None else trainable
    forward = forward_flops(n_params, tokens, layers=layers, attn_width=attn_width, context=context)
    attention = forward - 2.0 * n_params * tokens
    return forward + 2.0 * n_params * tokens + 2.0 * trainable * tokens + 2.0 * attention


def teacher_flops(teacher: object, tokens: int) -> float:
    """Forward FLOPs of a teacher over `tokens` scored or generated tokens: 2·N per token, with
    the N every backend reports as `matmul_params` (from its config, or --teacher-params);
    a teacher that reports none (a test fake, an unknown served model) counts 0."""
    return forward_flops(int(getattr(teacher, "matmul_params", 0) or 0), tokens)


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape; ZeRO-3 keeps it in `ds_shape` beside an empty local tensor
    (FSDP2's DTensors report the full shape themselves)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def matmul_params(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Parameters of a transformers model that take part in matrix products (see forward_flops):
    the matrices, less an untied input embedding (a lookup); norm scales and biases are not.
    `trainable_only`: those that also get a weight gradient (all of them, or LoRA's adapters)."""
    total = sum(
        full_numel(p)
        for p in model.parameters()
        if len(full_shape(p)) >= 2 and (p.requires_grad or not trainable_only)
    )
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return total
    emb, head = get_in(), get_out()
    tied = head is not None and head.weight is emb.weight
    counted = emb.weight.requires_grad or not trainable_only
    return total if tied or not counted else total - full_numel(emb.weight)


@dataclass
class PhaseTotals:
    seconds: float = 0.0  # wall-clock while this phase owned the clock
    device_seconds: float = 0.0  # wall-clock x devices charged to it
    tokens: int = 0
    flops: float = 0.0
    calls: int = 0


@dataclass
class Meter:
    """What a phase reports while it runs (tokens, FLOPs it processed); after it, its wall time."""

    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0  # set when the phase ends: the body's wall-clock, nested phases included

    def add(self, tokens: int, flops: float = 0.0) -> None:
        self.tokens += tokens
        self.flops += flops


class GpuLedger:
    """Charges every second since its start to one phase; `save` writes ledger.json atomically.

    `devices`: devices the student side holds (raised to the largest `devices` a student phase
    passes). `teacher_devices`: a remote teacher's devices, held for the whole run (0: the
    teacher runs on the student's devices, in-process).
    """

    def __init__(
        self, device: str | None = None, *, devices: int = 1, teacher_devices: int = 0
    ) -> None:
        if devices < 1 or teacher_devices < 0:
            raise DistillError(
                f"devices={devices}, teacher_devices={teacher_devices}: a run holds at least one "
                "device and a non-negative number of teacher devices (--teacher-gpus N)"
            )
        self.device = device or device_kind()
        self.devices = devices
        self.teacher_devices = teacher_devices
        self.phases: dict[str, PhaseTotals] = {}
        self.marks: dict[str, float] = {}  # label -> total device-hours when it was marked
        self.eval_points: list[float] = []  # total device-hours at the start of each eval round
        self.loaded: dict[str, PhaseTotals] = {}  # totals read from disk (see gather_ranks)
        self.session = "new"  # fingerprint of the ledger.json this session started from
        self.wall = 0.0  # seconds metered (each once, however many phases overlap)
        self.busy: dict[str, float] = {}  # device group -> seconds it had a phase working
        # per thread: its open phases as (name, devices, is_teacher), innermost last
        self._stacks: dict[int, list[tuple[str, int, bool]]] = {}
        self._lock = threading.RLock()  # phases of several threads share the clock
        self._last: str | None = None  # the phase that finished last
        self._mark = time.perf_counter()

    @property
    def _stack(self) -> list[tuple[str, int, bool]]:
        """The calling thread's open phases, innermost last."""
        return self._stacks.setdefault(threading.get_ident(), [])

    def _charge(self, now: float) -> None:
        """Charge the time since the last charge: each device group to the innermost phase of
        every thread working on it (shared evenly), or to its idle owner."""
        with self._lock:
            dt = now - self._mark
            self._mark = now
            if dt <= 0:
                return
            self.wall += dt
            for name, devices in self._owners():
                t = self.phases.setdefault(name, PhaseTotals())
                t.seconds += dt  # the time it worked (or idled), shared or not
                t.device_seconds += dt * devices
            for group in self._working():
                self.busy[group] = self.busy.get(group, 0.0) + dt

    def _working(self) -> dict[str, list[tuple[str, int]]]:
        """Device group -> the (phase, devices) of each thread's innermost phase working on it."""
        groups: dict[str, list[tuple[str, int]]] = {}
        for stack in self._stacks.values():
            if stack:
                name, devices, is_teacher = stack[-1]
                group = TEACHER if is_teacher and self.teacher_devices else STUDENT
                groups.setdefault(group, []).append((name, devices))
        return groups

    def _owners(self) -> list[tuple[str, float]]:
        """(phase, devices charged to it) for the interval now ending; one thread working gives
        the synchronous rules above."""
        working = self._working()
        if not working:
            return [(WAITING, self.devices + self.teacher_devices)]
        owners: list[tuple[str, float]] = []
        for group, idle, held in (
            (STUDENT, WAITING, self.devices),
            (TEACHER, RESERVED if STUDENT in working else WAITING, self.teacher_devices),
        ):
            phases = working.get(group, [])
            owners += [(name, devices / len(phases)) for name, devices in phases]
            if not phases and held:
                owners.append((idle, held))
        return owners

    @contextmanager
    def phase(self, name: str, devices: int | None = None) -> Iterator[Meter]:
        """Meter the body: `with ledger.phase("teacher.score") as m: ...; m.add(n, flops)`.

        `devices=None`: a `teacher.*` phase holds the declared teacher devices (or the student's
        when the teacher is in-process); any other phase holds the student's devices.
        """
        is_teacher = name.startswith("teacher.")
        if devices is None:
            devices = self.teacher_devices if is_teacher and self.teacher_devices else self.devices
        assert devices >= 1, devices
        if not is_teacher:
            self.devices = max(self.devices, devices)
        meter = Meter()
        with self._lock:
            now = time.perf_counter()
            self._charge(now)
            first = self._last != "eval" and all(n != "eval" for n, _, _ in self._stack)
            if name == "eval" and first:
                self.eval_points.append(self.total_device_hours())  # a new evaluation round
            self._stack.append((name, devices, is_teacher))
        try:
            yield meter
        except BaseException as e:
            e.__dict__.setdefault("distill_phase", name)  # innermost: the CLI's crash line names it
            raise
        finally:
            with self._lock:
                end = time.perf_counter()
                meter.seconds = end - now
                self._charge(end)
                self._stack.pop()
                totals = self.phases.setdefault(name, PhaseTotals())
                totals.tokens += meter.tokens
                totals.flops += meter.flops
                totals.calls += 1
                self._last = name

    def mark(self, label: str) -> None:
        """Remember the total device-hours now under `label` (e.g. an evaluation stage)."""
        self._charge(time.perf_counter())
        self.marks[label] = self.total_device_hours()

    def device_hours(self) -> dict[str, float]:
        return {name: t.device_seconds / 3600 for name, t in self.phases.items()}

    def total_device_hours(self) -> float:
        return sum(self.device_hours().values())

    def wall_seconds(self) -> float:
        """Wall-clock metered, each second once however many phases overlapped in it."""
        return self.wall

    def busy_fractions(self) -> dict[str, float]:
        """Device group -> the share of the wall-clock it had a phase working (teacher: only a
        remote teacher's own devices; an in-process teacher works on the student's)."""
        groups = [STUDENT] + ([TEACHER] if self.teacher_devices else [])
        return {g: self.busy.get(g, 0.0) / self.wall if self.wall else 0.0 for g in groups}

    def mfu(self) -> dict[str, float | None]:
        """FLOPs / (device-seconds x peak) per phase; None on a CPU or without metered FLOPs."""
        peak = peak_flops(self.device)
        return {
            name: t.flops / (t.device_seconds * peak)
            if peak and t.flops and t.device_seconds
            else None
            for name, t in self.phases.items()
        }

    def to_json(self) -> dict[str, object]:
        return {
            "device": self.device,
            "unit": unit(self.device),
            "devices": self.devices,
            "teacher_devices": self.teacher_devices,
            "peak_flops": peak_flops(self.device),
            "phases": {name: asdict(t) for name, t in self.phases.items()},
            "device_hours": self.device_hours(),
            "total_device_hours": self.total_device_hours(),
            "wall_seconds": self.wall_seconds(),
            "busy_seconds": dict(self.busy),
            "busy_fractions": self.busy_fractions(),
            "mfu": self.mfu(),
            "marks": dict(self.marks),
            "eval_points": list(self.eval_points),
        }

    def save(self, path: Path, *, rank: int = 0) -> None:
        """Charge the time up to now, then write atomically: the job's ledger from rank 0, a shard
        from any other process.

        Processes of an accelerate job never exchange ledgers over the process group (a gather at
        checkpoint time left a rank hanging at exit in about 1 launch in 4). Instead rank r > 0
        writes `ledger.rank<r>.json` next to `path`, and rank 0 merges the shards of this session
        (see `gather_ranks`) into `path`. The loops write the shards before the checkpoint's
        barrier and rank 0 merges after it, so the merge sees every process's latest totals;
        shards left by an earlier session (another fingerprint) are ignored.
        """
        self._charge(time.perf_counter())
        if rank:
            shard = {"session": self.session, "ledger": self.to_json()}
            shard["loaded"] = {n: asdict(t) for n, t in self.loaded.items()}
            atomic_write_json(shard_path(path, rank), shard)
            return
        ledgers = [self, *read_shards(path, self.session)]
        job = gather_ranks(ledgers) if len(ledgers) > 1 else self
        atomic_write_json(path, job.to_json())

    @classmethod
    def from_json(cls, data: dict[str, object], source: Path) -> GpuLedger:
        """The ledger `to_json` wrote; `source` names the file in the error."""
        phases = data.get("phases")
        if not isinstance(phases, dict):
            raise DistillError(
                f"{source} is not a distill ledger (no 'phases'); delete or restore it"
            )
        ledger = cls(
            device=str(data["device"]),
            devices=int(data.get("devices", 1)),  # type: ignore[arg-type]
            teacher_devices=int(data.get("teacher_devices", 0)),  # type: ignore[arg-type]
        )
        known = {f.name for f in fields(PhaseTotals)}
        for name, t in phases.items():
            ledger.phases[name] = PhaseTotals(**{k: v for k, v in t.items() if k in known})
        ledger.marks = {str(k): float(v) for k, v in data.get("marks", {}).items()}  # type: ignore[union-attr]
        ledger.eval_points = [float(v) for v in data.get("eval_points", [])]  # type: ignore[union-attr]
        if "wall_seconds" in data:  # written by every ledger; a hand-made one may lack it
            ledger.wall = float(data["wall_seconds"])  # type: ignore[arg-type]
        else:
            ledger.wall = sum(t.seconds for n, t in ledger.phases.items() if n != RESERVED)
        busy = data.get("busy_seconds", {})  # absent before device groups were metered
        ledger.busy = {str(k): float(v) for k, v in busy.items()}  # type: ignore[union-attr]
        return ledger

    @classmethod
    def load(cls, path: Path, *, teacher_devices: int | None = None) -> GpuLedger:
        """Read a saved ledger; its clock restarts now (time between a kill and a resume is free).

        `teacher_devices` overrides the saved declaration for the new session.
        """
        data = read_json(path)
        if not isinstance(data, dict):
            raise DistillError(
                f"{path} is not a distill ledger (no 'phases'); delete or restore it"
            )
        ledger = cls.from_json(data, path)
        if teacher_devices is not None:
            ledger.teacher_devices = teacher_devices
        ledger.loaded = {name: replace(t) for name, t in ledger.phases.items()}
        ledger.session = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return ledger

    @classmethod
    def load_or_new(cls, path: Path, *, teacher_devices: int | None = None) -> GpuLedger:
        if path.exists():
            return cls.load(path, teacher_devices=teacher_devices)
        return cls(teacher_devices=teacher_devices or 0)


def gather_ranks(ledgers: Sequence[GpuLedger]) -> GpuLedger:
    """One ledger for a job whose processes each kept one (rank 0 first).

    Every process of an accelerate job meters the same phases over the same wall-clock and the
    loops pass the job's device count (`devices=num_processes`), so time is taken from the
    slowest rank (max), while tokens and FLOPs, which each process counts for its own shard, are
    summed. Totals loaded from disk on resume sit in every rank's ledger and count once.
    """
    head = ledgers[0]
    out = GpuLedger(head.device, devices=head.devices, teacher_devices=head.teacher_devices)
    out.marks, out.eval_points = dict(head.marks), list(head.eval_points)
    out.wall = max(ledger.wall for ledger in ledgers)  # each: the loaded base + its session
    for group in dict.fromkeys(g for ledger in ledgers for g in ledger.busy):
        out.busy[group] = max(ledger.busy.get(group, 0.0) for ledger in ledgers)
    for name in dict.fromkeys(n for ledger in ledgers for n in ledger.phases):
        base = head.loaded.get(name, PhaseTotals())
        deltas = []
        for ledger in ledgers:
            t = ledger.phases.get(name, PhaseTotals())
            b = ledger.loaded.get(name, PhaseTotals())
            deltas.append(
                PhaseTotals(
                    **{f.name: getattr(t, f.name) - getattr(b, f.name) for f in fields(PhaseTotals)}
                )
            )
        out.phases[name] = PhaseTotals(
            seconds=base.seconds + max(d.seconds for d in deltas),
            device_seconds=base.device_seconds + max(d.device_seconds for d in deltas),
            tokens=base.tokens + sum(d.tokens for d in deltas),
            flops=base.flops + sum(d.flops for d in deltas),
            calls=base.calls + max(d.calls for d in deltas),
        )
    return out


def shard_path(path: Path, rank: int) -> Path:
    """ledger.json -> ledger.rank1.json: where process `rank` keeps its own totals."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_shards(path: Path, session: str) -> list[GpuLedger]:
    """The other processes' ledgers of this session, in rank order (see `GpuLedger.save`)."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}")
    ranked = {}
    for candidate in path.parent.iterdir():
        if match := pattern.fullmatch(candidate.name):
            ranked[int(match.group(1))] = candidate
    shards = []
    for _, shard in sorted(ranked.items()):
        data = read_json(shard)
        if not isinstance(data, dict) or data.get("session") != session:
            continue  # an earlier session's: its work is already in ledger.json, or was lost
        ledger = GpuLedger.from_json(data["ledger"], shard)  # type: ignore[arg-type]
        ledger.loaded = {n: PhaseTotals(**t) for n, t in data["loaded"].items()}  # type: ignore[union-attr]
        shards.append(ledger)
    return shards
