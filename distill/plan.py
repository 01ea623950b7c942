"""Plan a run before paying for it: device-hours of off-policy distillation, on-policy
distillation and an RL baseline, from a FLOP and bandwidth model with every assumption stated.

    distill plan --student 8B --teacher 235B-A22B --prompts 4000 --samples 4 --response-len 8192

Model: training and prefill (teacher scoring) are compute-bound, seconds = FLOPs / (peak x MFU);
decoding (generation, sampling) is bandwidth-bound at realistic batch sizes: each step reads the
weights once for the whole batch plus every sequence's KV cache, seconds = max(bytes / (bandwidth x
utilisation), FLOPs / (peak x MFU)). Device-hours of a phase do not depend on how many devices
run it, except that a decoding replica holds `replica_devices` devices. docs/accounting.md walks
through the worked example and what drives the on-policy : RL ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from distill.accounting import BANDWIDTH, PEAK_FLOPS, forward_flops, train_flops
from distill.architectures import Architecture, architecture
from distill.errors import DistillError
from distill.validation import check_fields

MEMORY_BYTES = {"H100": 80e9, "H200": 141e9, "A100": 80e9, "L40S": 48e9}


@dataclass(frozen=True, kw_only=True)
class Assumptions:
    """Every number the estimate rests on; `distill plan` prints them all."""

    student: str = "8B"
    teacher: str = "235B-A22B"
    gpu: str = "H100"
    prompts: int = 4000  # distinct training prompts
    prompt_len: int = 512  # tokens per rendered prompt
    samples: int = 4  # responses per prompt, off-policy (teacher) and on-policy (student)
    response_len: int = 8192  # mean tokens per response
    offpolicy_epochs: float = 2.0  # passes of the student over the teacher data
    onpolicy_passes: float = 1.0  # passes of on-policy sampling over the prompts
    rl_steps: int = 170
    rl_prompts_per_step: int = 128
    rl_rollouts: int = 16  # G: rollouts per prompt
    rl_response_len: int = 0  # 0: same as response_len
    rl_logprob_passes: int = 1  # extra forwards per rollout token (old policy / reference)
    mfu: float = 0.35  # compute-bound phases: training and prefill
    bandwidth_utilisation: float = 0.6  # bandwidth-bound phases: decoding
    decode_batch: int = 128  # concurrent sequences per decoding replica, at most
    bytes_per_param: int = 2  # bf16 weights and KV cache
    # Student tokens sampled per second per GPU, ONE number for on-policy distillation and RL
    # (both sample with the same engine, distill/sampling.py); 0: the decode model's rate at
    # response_len.
    sampling_throughput: float = 0.0
    # Asynchronous on-policy steps (distill onpolicy --max-staleness): 0 plans them in series.
    max_staleness: int = 0
    student_devices: int = 8  # the student's group: its sampling engine and its training
    teacher_devices: int = 0  # the teacher's group, held apart; 0: one teacher replica

    def check(self) -> None:
        check_fields(self)  # finite numbers, non-negative counts
        if self.gpu not in PEAK_FLOPS:
            raise DistillError(f"--gpu {self.gpu!r} is not one of {', '.join(PEAK_FLOPS)}")
        if not (0 < self.mfu <= 1 and 0 < self.bandwidth_utilisation <= 1):
            raise DistillError("--mfu and --bandwidth-utilisation must lie in (0, 1]")
        counts = (
            self.prompts,
            self.prompt_len,
            self.samples,
            self.response_len,
            self.rl_steps,
            self.rl_prompts_per_step,
            self.rl_rollouts,
            self.decode_batch,
        )
        if self.sampling_throughput < 0:
            raise DistillError("--sampling-throughput must be >= 0 (0: from the decode model)")
        if self.max_staleness < 0 or self.student_devices < 1 or self.teacher_devices < 0:
            raise DistillError(
                "--max-staleness and --teacher-devices must be >= 0, --student-devices >= 1"
            )
        if min(counts) < 1 or self.offpolicy_epochs < 0 or self.onpolicy_passes < 0:
            raise DistillError("counts and lengths in a plan must be positive: check the options")
        architecture(self.student)
        architecture(self.teacher)


# The worked example of docs/accounting.md: the paper's scale as we read it (see there).
PAPER_SCALE = Assumptions(samples=8)


@dataclass(frozen=True, kw_only=True)
class PhaseEstimate:
    phase: str  # a ledger phase name
    model: str
    tokens: float  # tokens processed (generated, scored or trained on)
    flops: float
    bound: str  # "compute" or "memory"
    devices: int  # devices one replica holds
    batch: int = 0  # sequences decoded at once (decoding phases)
    device_hours: float


@dataclass(frozen=True, kw_only=True)
class Workload:
    method: str
    phases: tuple[PhaseEstimate, ...]

    @property
    def device_hours(self) -> float:
        return sum(p.device_hours for p in self.phases)


def replica_devices(model: Architecture, a: Assumptions) -> int:
    """Smallest power-of-two tensor-parallel group whose weights fill <= 60% of its memory."""
    weights = model.params() * a.bytes_per_param
    n = 1
    while weights > 0.6 * MEMORY_BYTES[a.gpu] * n:
        n *= 2
    return n


def weight_bytes_read(model: Architecture, a: Assumptions, batch: int) -> float:
    """Weight bytes one decoding step reads: an MoE layer reads only the experts its batch hits.

    With k of E experts per token, a batch of b tokens touches a share 1 - (1 - k/E)^b of them.
    """
    total = model.params() * a.bytes_per_param
    if not model.experts:
        return total
    expert_bytes = model.layers * model.experts * 3 * model.hidden * model.expert_intermediate
    expert_bytes *= a.bytes_per_param
    touched = 1 - (1 - model.active_experts / model.experts) ** batch
    return total - expert_bytes * (1 - touched)


def batch_that_fits(model: Architecture, a: Assumptions, length: int) -> int:
    """Sequences a replica decodes at once: `decode_batch`, or fewer when their KV caches at full
    length (prompt + response) would not fit in 90% of the memory the weights leave free."""
    devices = replica_devices(model, a)
    free = 0.9 * MEMORY_BYTES[a.gpu] * devices - model.params() * a.bytes_per_param
    per_sequence = model.kv_bytes_per_token(a.bytes_per_param) * (a.prompt_len + length)
    return max(1, min(a.decode_batch, int(free // per_sequence)))


def decode(
    phase: str, model: Architecture, sequences: float, a: Assumptions, length: int
) -> PhaseEstimate:
    """Generate `length` tokens for each of `sequences` sequences, `decode_batch` at a time."""
    devices = replica_devices(model, a)
    context = a.prompt_len + length / 2  # mean positions attended while generating
    b = batch_that_fits(model, a, length)
    step_bytes = weight_bytes_read(model, a, b) + b * context * model.kv_bytes_per_token(
        a.bytes_per_param
    )
    step_flops = forward_flops(
        model.matmul_params(), b, layers=model.layers, attn_width=model.attn_width, context=context
    )
    t_memory = step_bytes / (BANDWIDTH[a.gpu] * devices * a.bandwidth_utilisation)
    t_compute = step_flops / (PEAK_FLOPS[a.gpu] * devices * a.mfu)
    tokens = sequences * length
    steps = tokens / b
    return PhaseEstimate(
        phase=phase,
        model=model.name,
        tokens=tokens,
        flops=steps * step_flops,
        bound="memory" if t_memory >= t_compute else "compute",
        devices=devices,
        batch=b,
        device_hours=steps * max(t_memory, t_compute) * devices / 3600,
    )


def sampling_rate(a: Assumptions) -> float:
    """Student tokens sampled per second per GPU, the one rate both methods' sampling costs:
    `sampling_throughput`, or the decode model's rate for the student at `response_len`."""
    if a.sampling_throughput:
        return a.sampling_throughput
    est = decode("student.sample", architecture(a.student), 1, a, a.response_len)
    return est.tokens / (est.device_hours * 3600)


def sample(model: Architecture, sequences: float, a: Assumptions, length: int) -> PhaseEstimate:
    """The student samples `length` tokens for each sequence at `sampling_rate`: on-policy
    distillation and RL are charged the same per sampled token, whatever their lengths."""
    est = decode("student.sample", model, sequences, a, length)
    hours = est.tokens / sampling_rate(a) / 3600
    return replace(est, device_hours=hours, bound="stated" if a.sampling_throughput else est.bound)


def compute(
    phase: str,
    model: Architecture,
    sequences: float,
    a: Assumptions,
    length: int,
    *,
    train: bool,
    passes: float = 1.0,
) -> PhaseEstimate:
    """A prefill (scoring) or training pass over prompt + response of each sequence."""
    seq = a.prompt_len + length
    tokens = sequences * seq * passes
    count = train_flops if train else forward_flops
    flops = (
        count(
            model.matmul_params(),
            1,
            layers=model.layers,
            attn_width=model.attn_width,
            context=seq / 2,
        )
        * tokens
    )
    return PhaseEstimate(
        phase=phase,
        model=model.name,
        tokens=tokens,
        flops=flops,
        bound="compute",
        devices=replica_devices(model, a),
        device_hours=flops / (PEAK_FLOPS[a.gpu] * a.mfu) / 3600,
    )


def estimate(a: Assumptions) -> tuple[Workload, Workload, Workload]:
    """(off-policy distillation, on-policy distillation, RL) for the assumptions."""
    a.check()
    student, teacher = architecture(a.student), architecture(a.teacher)
    L = a.response_len
    off_seqs = a.prompts * a.samples
    off = Workload(
        method="off-policy distillation",
        phases=(
            decode("teacher.generate", teacher, off_seqs, a, L),
            compute("teacher.score", teacher, off_seqs, a, L, train=False),
            compute(
                "student.train", student, off_seqs, a, L, train=True, passes=a.offpolicy_epochs
            ),
        ),
    )
    on_seqs = a.prompts * a.samples * a.onpolicy_passes
    on = Workload(
        method="on-policy distillation",
        phases=(
            sample(student, on_seqs, a, L),
            compute("teacher.score", teacher, on_seqs, a, L, train=False),
            compute("student.train", student, on_seqs, a, L, train=True),
        ),
    )
    rl_len = a.rl_response_len or L
    rl_seqs = a.rl_steps * a.rl_prompts_per_step * a.rl_rollouts
    phases = [
        sample(student, rl_seqs, a, rl_len),
        compute("student.train", student, rl_seqs, a, rl_len, train=True),
    ]
    if a.rl_logprob_passes:
        phases.append(
            compute(
                "student.score",
                student,
                rl_seqs,
                a,
                rl_len,
                train=False,
                passes=a.rl_logprob_passes,
            )
        )
    return off, on, Workload(method="RL (GRPO)", phases=tuple(phases))


def sampled_tokens(w: Workload) -> float:
    """Tokens the method had to generate: what its per-token costs multiply."""
    return sum(p.tokens for p in w.phases if p.phase in ("teacher.generate", "student.sample"))


def describe(a: Assumptions) -> list[tuple[str, str, str]]:
    """(assumption, value, where it comes from) rows, the derived ones included."""
    student, teacher = architecture(a.student), architecture(a.teacher)
    rows = [
        ("GPU", a.gpu, "--gpu"),
        ("peak bf16 dense", f"{PEAK_FLOPS[a.gpu] / 1e12:.0f} TFLOP/s", "vendor data sheet"),
        ("memory bandwidth", f"{BANDWIDTH[a.gpu] / 1e12:.2f} TB/s", "vendor data sheet"),
        ("device memory", f"{MEMORY_BYTES[a.gpu] / 1e9:.0f} GB", "vendor data sheet"),
        ("MFU (training, prefill)", f"{a.mfu:.2f}", "--mfu"),
        (
            "bandwidth utilisation (decoding)",
            f"{a.bandwidth_utilisation:.2f}",
            "--bandwidth-utilisation",
        ),
        ("decode batch per replica", str(a.decode_batch), "--decode-batch"),
        (
            "student sampling, on-policy and RL alike",
            f"{sampling_rate(a):,.0f} tokens/s per GPU",
            "--sampling-throughput"
            if a.sampling_throughput
            else "decode model at --response-len; --sampling-throughput sets it",
        ),
        ("bytes per weight / KV value", str(a.bytes_per_param), "bf16"),
    ]
    for role, m in (("student", student), ("teacher", teacher)):
        rows += [
            (f"{role}", m.name, f"--{role}"),
            (
                f"{role} parameters (total / active)",
                f"{m.params() / 1e9:.2f}B / {m.params(active=True) / 1e9:.2f}B",
                f"computed from the architecture; published {m.published_total / 1e9:g}B / "
                f"{m.published_active / 1e9:g}B",
            ),
            (
                f"{role} forward FLOPs/token",
                f"2 x {m.matmul_params() / 1e9:.2f}B + attention",
                "2·N (matmul params) + 4·L·d_attn·context",
            ),
            (
                f"{role} KV cache per token",
                f"{m.kv_bytes_per_token() / 1e3:.0f} kB",
                "2·layers·kv_heads·head_dim·bytes",
            ),
            (
                f"{role} decode batch",
                str(batch_that_fits(m, a, a.response_len)),
                "--decode-batch, capped so full-length KV caches fit in 90% of free memory",
            ),
            (
                f"{role} replica",
                f"{replica_devices(m, a)} device(s)",
                "smallest power of two with weights <= 60% of memory",
            ),
        ]
    rows += [
        ("prompts", f"{a.prompts:,}", "--prompts"),
        ("prompt length", f"{a.prompt_len:,} tokens", "--prompt-len"),
        ("samples per prompt (distillation)", str(a.samples), "--samples"),
        ("response length", f"{a.response_len:,} tokens", "--response-len"),
        ("off-policy epochs", f"{a.offpolicy_epochs:g}", "--offpolicy-epochs"),
        ("on-policy passes over the prompts", f"{a.onpolicy_passes:g}", "--onpolicy-passes"),
        (
            "RL steps x prompts/step x rollouts",
            f"{a.rl_steps} x {a.rl_prompts_per_step} x {a.rl_rollouts}",
            "--rl-steps, --rl-prompts-per-step, --rl-rollouts",
        ),
        (
            "RL response length",
            f"{a.rl_response_len or a.response_len:,} tokens",
            "--rl-response-len (0: --response-len)",
        ),
        ("RL extra log-prob forwards", str(a.rl_logprob_passes), "--rl-logprob-passes"),
        ("training FLOPs", "3 x forward", "backward = 2 x forward"),
        ("teacher scoring", "one prefill of prompt + response", "docs/facts.md"),
    ]
    if a.max_staleness:
        dt = a.teacher_devices or replica_devices(teacher, a)
        rows += [
            ("on-policy max staleness", str(a.max_staleness), "--max-staleness"),
            ("student devices (sample, train)", str(a.student_devices), "--student-devices"),
            ("teacher devices (score), apart", str(dt), "--teacher-devices (0: one replica)"),
        ]
    return rows


def ratio_decomposition(on: Workload, rl: Workload) -> tuple[float, float]:
    """RL / on-policy device-hours = (sampled-token ratio) x (device-hours per sampled token ratio).

    Both methods decode their own rollouts and then run compute-bound passes over them (teacher
    prefill + student training for on-policy; student training + log-prob forwards for RL), so
    the per-token costs are close and the rollout count sets the ratio.
    """
    tokens = sampled_tokens(rl) / sampled_tokens(on)
    per_token = (rl.device_hours / sampled_tokens(rl)) / (on.device_hours / sampled_tokens(on))
    return tokens, per_token


@dataclass(frozen=True, kw_only=True)
class HeldEstimate:
    """On-policy distillation as held devices see it: the student's group and the teacher's."""

    student_devices: int
    teacher_devices: int
    series_hours: float  # device-hours held, sample -> score -> train in series (S = 0)
    overlapped_hours: float  # held with the next step sampled and scored ahead (S >= 1)
    student_busy: float  # share of the held time the student's group works, overlapped
    teacher_busy: float

    @property
    def ratio(self) -> float:
        return self.overlapped_hours / self.series_hours


def held(a: Assumptions, on: Workload) -> HeldEstimate:
    """Device-hours *held* by on-policy distillation with the teacher on its own devices.

    Each phase's wall time is its device-hours over its group's devices (a phase's device-hours
    do not depend on the device count, as above). In series a step lasts sample + score + train
    and both groups are held throughout. Overlapped (distill/onpolicy/ahead.py: a sampler and a
    scorer thread ahead of the trainer) the student's devices sample and train, the teacher's
    score, and step k's sample -> score -> train chain spans S + 1 steps (it waits for version
    k - S), so in steady state a step lasts max(sample + train, score, (sample + score + train) /
    (S + 1)). The pipeline's fill (S steps) is left out, and so is the quality cost of
    staleness, which only a run measures.
    """
    ds = a.student_devices
    dt = a.teacher_devices or replica_devices(architecture(a.teacher), a)
    hours = {p.phase: p.device_hours for p in on.phases}
    t_sample, t_train = hours["student.sample"] / ds, hours["student.train"] / ds
    t_score = hours["teacher.score"] / dt
    series = t_sample + t_score + t_train
    chain = (t_sample + t_score + t_train) / (a.max_staleness + 1)
    overlapped = max(t_sample + t_train, t_score, chain)
    return HeldEstimate(
        student_devices=ds,
        teacher_devices=dt,
        series_hours=series * (ds + dt),
        overlapped_hours=overlapped * (ds + dt),
        student_busy=(t_sample + t_train) / overlapped,
        teacher_busy=t_score / overlapped,
    )
