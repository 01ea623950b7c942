"""On-policy distillation: the student samples, the teacher scores those tokens, the student
minimises a divergence to the teacher at every position it produced.

    distill onpolicy --run-dir runs/demo

Default divergence: reverse KL(p_s‖p_t) on the teacher's top-k + tail support (docs/onpolicy.md
gives the argument). It is the divergence of the student's own samples: mode-seeking, the student
is pushed off tokens the teacher finds unlikely instead of spreading mass over every teacher
mode, which is what the Qwen3 report, GKD and MiniLLM use on-policy; on the coarsened support it
is a true divergence, never negative.

One step: [sync the sampler's weights] -> student.sample (G responses per prompt, per mode, with
the mode's sampling preset; `lmbda` of the slots take teacher rows instead) -> teacher.score (top-k
plus the actual token, one prefill) -> student.train (loss on sampled response tokens only:
prompt and forced tokens never carry loss) -> metrics, checkpoint.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, PreTrainedModel

from distill import adapters, checkpoint, manifest, sampling
from distill.accounting import (
    GpuLedger,
    forward_flops,
    matmul_params,
    teacher_flops,
    train_flops,
)
from distill.batch import Example, collate
from distill.errors import DistillError
from distill.fused_step import choose_head, topk_loss
from distill.objective import (
    Dtype,
    LogFn,
    global_target_tokens,
    lr_at,
    no_log,
    resolve_dtype,
    set_lr,
    topk_divergence,
)
from distill.offpolicy.train import check_head
from distill.onpolicy.metrics import Diagnostics, Lengths, accumulate, measured_mask
from distill.onpolicy.rollout import (
    OffPolicyRow,
    Rollout,
    check_request,
    load_rows,
    sample_slots,
)
from distill.onpolicy.schedule import check_modes, position, step_slots
from distill.prompts import Prompt
from distill.rundir import append_metrics, prepare
from distill.sampling import SamplerKind, make_sampler, sync_due
from distill.validation import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    check_budget,
    check_fields,
)
from losses import Divergence
from students.dtype import resolve_name
from students.placement import EnginePlacement
from students.sample import Sampler
from teachers.chat import BUDGET_SENTENCE, MODES, Mode
from teachers.protocol import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams, Teacher

Truncation = Literal["mask", "drop", "keep"]


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # usually RUN_DIR/offpolicy/checkpoint
    output: str = "onpolicy"
    steps: Annotated[int, AT_LEAST_1] = 50
    prompts_per_step: Annotated[int, AT_LEAST_1] = 8  # slots per step; each gives G sequences
    samples_per_prompt: Annotated[int, AT_LEAST_1] = 2  # G
    micro_batch_size: Annotated[int, AT_LEAST_1] = 8
    modes: tuple[Mode, ...] = MODES
    # exact share of on-policy prompts in thinking mode (both modes on)
    think_ratio: Annotated[float, FRACTION] = 0.5
    soft_switch: bool = False  # /think, /no_think in the user turn (the model writes the block)
    max_tokens: Annotated[int, AT_LEAST_1] = 256
    # thinking tokens before the budget sentence is forced
    thinking_budget: Annotated[int, AT_LEAST_1] | None = None
    budget_sentence: str = BUDGET_SENTENCE
    top_k: Annotated[int, AT_LEAST_1] = 16  # teacher log-probs per position (vLLM: <= max_logprobs)
    divergence: Divergence = "reverse_kl"
    beta: Annotated[float, FRACTION] = 0.5  # JSD(β): 0 forward KL, 1 reverse KL (TRL's convention)
    alpha: Annotated[float, Range(lo=0, hi=1, hi_open=True)] = 0.1  # skew KL mixing weight
    # share of slots filled from the teacher's dataset (GKD's mixing)
    lmbda: Annotated[float, FRACTION] = 0.0
    data_dir: Path | None = None  # teacher rows for lmbda > 0; default RUN_DIR/teacher_data
    truncation: Truncation = "keep"  # responses at max_tokens: trained / no loss / not used
    sampler: SamplerKind = "auto"  # auto: vllm with CUDA and vllm installed, else hf
    # steps between weight pushes into a vllm sampler (hf: always current)
    sync_every: Annotated[int, AT_LEAST_1] = 1
    engine: EnginePlacement = EnginePlacement()  # the vLLM sampler on GPUs: students/placement
    # an SFT-converged student: 5e-4 raised the very reverse KL it minimises
    lr: Annotated[float, NON_NEGATIVE] = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: Annotated[float, FRACTION] = 0.1
    grad_clip: Annotated[float, POSITIVE] = 1.0
    dtype: Dtype = "auto"  # the student checkpoint's own where supported (students/dtype.py)
    gradient_checkpointing: bool = False  # recompute layer activations in the backward
    log_every: Annotated[int, AT_LEAST_1] = 1
    save_every: Annotated[int, AT_LEAST_1] = 25
    seed: int = 0
    lora_rank: int = 0  # > 0: rank-r LoRA adapters on a frozen base (distill/adapters.py)
    lora_alpha: Annotated[int, AT_LEAST_1] | None = None  # scale = alpha / rank; None: 2 x rank
    fused_loss: bool = True  # loss from hidden states in chunks, no (B, T, V) logits (fused_step)
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and choices, from the field types above
        check_budget(self.thinking_budget, self.max_tokens)
        check_modes(self.modes, self.think_ratio, 0.0, [])  # the teacher's rows: at train time


@dataclass(frozen=True, kw_only=True)
class Summary:
    steps: int
    final_loss: float
    checkpoint: Path
    metrics: dict[str, float]  # the last step's


def build_examples(rollouts: list[Rollout], truncation: Truncation) -> list[Example]:
    """Examples whose `train` mask covers sampled response tokens only.

    Prompt tokens are never targets (collate places `train` on response positions); forced
    tokens (the budget sentence, or teacher rows' forced ids) were not chosen by the student;
    a truncated response carries no loss under "mask" ("drop" removed it before scoring).
    """
    examples = []
    for r in rollouts:
        cut = r.generation.finish_reason == "length" and truncation == "mask"
        train = ~np.asarray(r.generation.forced, dtype=bool) & (not cut)
        examples.append(
            Example(
                prompt_ids=r.prompt_ids,
                response_ids=r.generation.token_ids.tolist(),
                train=train,
                topk=r.scores,
            )
        )
    return examples


def trainer_state(optimizer: torch.optim.Optimizer, step: int, config: Config) -> dict[str, Any]:
    """What a resume needs beyond the weights; the LR schedule is a function of the step."""
    after = position(step + 1, config.prompts_per_step, config.lmbda)
    return {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "prompt_position": after.prompt,
        "offpolicy_position": after.offpolicy,
        "torch_rng": torch.get_rng_state(),
        # sampling seeds derive from (seed, step, mode): recorded, not needed to resume
        "sampler_seed_base": config.seed * 1_000_003 + (step + 1) * 2,
    }


def restore(
    resume: Path,
    optimizer: torch.optim.Optimizer,
    config: Config,
    student: PreTrainedModel | None = None,
) -> int:
    """Load the optimizer and RNG state (and `student`'s LoRA adapters, if any) from checkpoint
    `resume`; returns the step to run next."""
    state = checkpoint.load_state(resume)
    if student is not None:
        adapters.restore(student, state, resume)
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["step"]) + 1
    if "torch_rng" in state:  # absent in checkpoints written before this loop recorded it
        torch.set_rng_state(state["torch_rng"])
    # The streams are functions of the step; the saved positions prove the plan is the same.
    here = position(start, config.prompts_per_step, config.lmbda)
    saved = (
        state.get("prompt_position", here.prompt),
        state.get("offpolicy_position", here.offpolicy),
    )
    if (here.prompt, here.offpolicy) != saved:
        raise DistillError(
            f"checkpoint {resume} was written by a run with another prompt plan (prompts_per_step "
            "or lmbda changed): use a new --run-dir, or delete that checkpoint to restart"
        )
    return start


def train(
    config: Config,
    teacher: Teacher,
    prompts: list[Prompt],
    ledger: GpuLedger,
    log: LogFn = no_log,
    sampler: Sampler | None = None,
) -> Summary:
    """Student samples -> teacher scores -> student minimises the divergence; resumes exactly.

    `sampler`: an already running student sampler to reuse (it is synced to the student before
    the first step and left open); by default one is built from `config.sampler` and closed.
    """
    check_request(config, teacher, prompts)
    lora_config = adapters.settings(config.lora_rank, config.lora_alpha, config.seed)
    rows: list[OffPolicyRow] = []
    if config.lmbda > 0:
        rows = load_rows(config.data_dir or config.run_dir / "teacher_data", config.modes)
    check_modes(config.modes, config.think_ratio, config.lmbda, [r.mode for r in rows])
    prepare(config.run_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out = config.run_dir / config.output / "checkpoint"
    resume = checkpoint.latest(out)
    source = str(resume) if resume else config.student
    tokenizer = AutoTokenizer.from_pretrained(source)
    if len(tokenizer) != teacher.vocab_size:
        raise DistillError(
            f"the student's tokenizer has {len(tokenizer)} ids, the teacher {teacher.name} "
            f"{teacher.vocab_size}: distil only into a student with the teacher's tokenizer"
        )
    # LoRA: the frozen base always comes from config.student; the checkpoint holds it merged.
    student = adapters.load(
        config.student,
        resume,
        resolve_dtype(config.dtype, config.student),
        lora_config,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    vocab_size, pad_id = len(tokenizer), int(tokenizer.pad_token_id)
    check_head(student, vocab_size, source)
    n_params = matmul_params(student)  # FLOPs: see distill/accounting.py
    n_trainable = matmul_params(student, trainable_only=True)  # LoRA: adapters
    params = adapters.trainable(student)  # every weight, or only the LoRA adapters
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    start = restore(resume, optimizer, config, student) if resume else 0
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    head = choose_head(config.fused_loss, accelerator, accelerator.unwrap_model(student))
    head_weight = accelerator.unwrap_model(student).get_output_embeddings().weight  # (V, H)
    if start >= config.steps:  # finished before: nothing to sample, no engine to start
        return Summary(steps=config.steps, final_loss=float("nan"), checkpoint=out, metrics={})
    owned = sampler is None
    if sampler is None:
        model = accelerator.unwrap_model(student)
        sampler = make_sampler(
            config.sampler,
            model,
            source,
            tokenizer,
            prompts,
            modes=config.modes,
            max_tokens=config.max_tokens,
            seed=config.seed,
            dtype=resolve_name(config.dtype, config.student),  # the training dtype
            soft_switch=config.soft_switch,
            placement=config.engine,
            budget_sentence=config.budget_sentence,
        )
    if accelerator.is_main_process:  # what `report compare` checks against the RL run
        built = manifest.setup(
            accelerator,
            dtype=head_weight.dtype,
            fused=head.fused,
            loss_reason=head.reason,
            lora_rank=config.lora_rank,
            sampler=sampling.describe(sampler, config.sync_every),
        )
        manifest.record_setup(config.run_dir, config.output, built)
    loss, metrics = float("nan"), {}
    for step in range(start, config.steps):
        t_step = time.perf_counter()
        if sync_due(step, start, config.sync_every):
            sampler.sync(accelerator.unwrap_model(student))
        slots = step_slots(
            step=step,
            seed=config.seed,
            prompts_per_step=config.prompts_per_step,
            samples_per_prompt=config.samples_per_prompt,
            lmbda=config.lmbda,
            modes=config.modes,
            think_ratio=config.think_ratio,
            n_prompts=len(prompts),
            row_modes=[r.mode for r in rows],
        )
        mine = slots[accelerator.process_index :: accelerator.num_processes]
        with ledger.phase("student.sample", devices=accelerator.num_processes) as meter:
            t0 = time.perf_counter()
            rollouts = sample_slots(config, step, mine, sampler, tokenizer, prompts, rows)
            n_sampled = sum(len(r.generation.token_ids) for r in rollouts if r.on_policy)
            meter.add(n_sampled, forward_flops(n_params, n_sampled))
            t_sample = time.perf_counter() - t0
        lengths = Lengths()
        for r in rollouts:
            truncated = r.generation.finish_reason == "length"
            lengths.add(r.mode, len(r.generation.token_ids), truncated and r.on_policy)
        if config.truncation == "drop":
            rollouts = [r for r in rollouts if r.generation.finish_reason != "length"]
        with ledger.phase("teacher.score") as meter:
            t0 = time.perf_counter()
            seqs = [[*r.prompt_ids, *r.generation.token_ids.tolist()] for r in rollouts]
            plens = [len(r.prompt_ids) for r in rollouts]
            scores = teacher.score(seqs, plens, config.top_k) if seqs else []
            rollouts = [replace(r, scores=s) for r, s in zip(rollouts, scores, strict=True)]
            n_scored = sum(len(s) for s in seqs)
            meter.add(n_scored, teacher_flops(teacher, n_scored))
            t_score = time.perf_counter() - t0
        examples = build_examples(rollouts, config.truncation)
        forced = [r.generation.forced for r in rollouts]
        groups = [
            range(i, min(i + config.micro_batch_size, len(examples)))
            for i in range(0, len(examples), config.micro_batch_size)
        ]
        micro = [collate([examples[i] for i in g], pad_id=pad_id) for g in groups]
        n_tokens = global_target_tokens(micro, accelerator)
        total, diag, n_trained = torch.zeros(()), Diagnostics(), 0
        with ledger.phase("student.train", devices=accelerator.num_processes) as meter:
            t0 = time.perf_counter()
            for i, (g, mb) in enumerate(zip(groups, micro, strict=True)):
                measured = measured_mask(
                    [examples[j] for j in g], [forced[j] for j in g], mb.input_ids.shape[1]
                )
                mb = mb.to(accelerator.device)
                kind, beta, alpha = config.divergence, config.beta, config.alpha
                with nullcontext() if i == len(micro) - 1 else accelerator.no_sync(student):
                    if head.fused:  # same loss and gradients; the diagnostics read its chunks
                        share, summed = topk_loss(
                            student,
                            head_weight,
                            mb,
                            n_tokens,
                            kind,
                            vocab_size,
                            beta=beta,
                            alpha=alpha,
                            measured=measured,
                            diag=diag,
                            workspace=head.workspace,
                        )  # share = sum / n_tokens, summed = sum over the loss mask
                    else:
                        logits = student(
                            input_ids=mb.input_ids, attention_mask=mb.attention_mask
                        ).logits  # (B, T, V)
                        per_token, _ = topk_divergence(
                            logits, mb, kind, vocab_size, beta=beta, alpha=alpha
                        )  # (B, T-1), zero off the loss mask
                        share, summed = per_token.sum() / n_tokens, per_token.detach().sum()
                        accumulate(diag, logits, mb, measured, vocab_size)
                    # Each backward adds its share of sum / (target tokens of the whole step).
                    accelerator.backward(share)
                    total += summed.cpu()
                n_trained += int(mb.attention_mask.sum())
                meter.add(
                    mb.n_targets,
                    train_flops(n_params, int(mb.attention_mask.sum()), trainable=n_trainable),
                )
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), config.grad_clip)
            c = config
            lr = lr_at(
                step, lr=c.lr, steps=c.steps, warmup=c.warmup_steps, min_ratio=c.min_lr_ratio
            )
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t_train = time.perf_counter() - t0
        loss = float(total) / (n_tokens * accelerator.num_processes)
        metrics = {
            "loss": loss,
            **diag.means(),
            **lengths.means(),
            "offpolicy_fraction": sum(s.prompt is None for s in slots) / len(slots),
            "loss_tokens": float(sum(mb.n_targets for mb in micro)),  # this process's
            "lr": lr,
            "fused_loss": float(head.fused),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "sample_tokens_per_s": n_sampled / max(t_sample, 1e-9),
            "score_tokens_per_s": n_scored / max(t_score, 1e-9),
            "train_tokens_per_s": n_trained / max(t_train, 1e-9),
            "step_seconds": time.perf_counter() - t_step,
        }
        if step % config.log_every == 0 or step == config.steps - 1:
            log(config.output, step + 1, config.steps, metrics)
            if accelerator.is_main_process:
                record = {"phase": config.output, "step": step, **metrics}
                append_metrics(
                    config.run_dir, {**record, "device_hours": ledger.total_device_hours()}
                )
        if (step + 1) % config.save_every == 0 or step == config.steps - 1:
            if not accelerator.is_main_process:  # before the barrier: rank 0 merges it after
                ledger.save(config.run_dir / "ledger.json", rank=accelerator.process_index)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                model = accelerator.unwrap_model(student)
                state = {**trainer_state(optimizer, step, config), **adapters.state(model)}
                checkpoint.save(out, adapters.export(model, config.student), tokenizer, state)
                ledger.save(config.run_dir / "ledger.json")
    if owned:
        sampling.close(sampler)
    return Summary(steps=config.steps, final_loss=loss, checkpoint=out, metrics=metrics)
