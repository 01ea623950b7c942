"""The training loops' losses from final hidden states and the lm_head: no (B, T, V) logits.

Each is the twin of a full-logits loss (distill/logits_loss.py, or the RL loop's) with the same
values and gradients; `choose_loss_path` decides once per run which of the two a loop takes.


With Qwen3's 151,936-row head the full forward's fp32 logits, their log-softmax and its gradient
are the largest activations of a step (B·T·V each). With `fused_loss` on, the loop still calls
the prepared (DDP-wrapped) model's forward, so gradient-sync hooks fire as usual, but asks for
logits at no position (`logits_to_keep` = an empty index) and takes the last hidden state, the
post-norm state lm_head consumes; only rows that carry loss (or are measured) go to
`losses.fused_linear_divergence_sum`, which runs them through the head in chunks with
closed-form gradients. The lm_head weight is used directly: its gradient reaches the same
parameter, so DDP averages it with the rest.

The fused path is exact only for a head that is one bias-free Linear on that hidden state, held
whole on this process. `choose_loss_path` checks that once per run and otherwise falls back to the
logits path, logging why: FSDP1 and DeepSpeed ZeRO-3 (the weight is a shard outside the forward;
FSDP2 keeps the root's head unsharded from forward to backward: `live_head`),
a head that is not a plain Linear (LoRA on lm_head, a bias), a config that scales or soft-caps
the logits, or a probe forward whose `lm_head(hidden)` differs from its own logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from distill.batch import Batch, next_token_view
from losses import (
    Divergence,
    DivergenceSpec,
    TeacherSampled,
    TeacherTopK,
    Workspace,
    fused_linear_divergence_sum,
)

logger = logging.getLogger(__name__)

# Config fields of architectures whose logits are not `lm_head(h)` (Gemma 2/3 soft-capping,
# Cohere's logit scale, Granite's divisor). Qwen3 has none of them.
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


# (logits (C, V_s), teacher ids (C, K), teacher log-probs (C, K), measured (C,)) of one chunk
RowObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LossPath:
    """Which loss path a run takes, and why (logged once, recorded as the `fused_loss` metric).

    `workspace` keeps the fused path's chunk buffers for the whole run: made once, not faulted
    in again by every micro-batch.
    """

    fused: bool
    reason: str
    workspace: Workspace = field(default_factory=Workspace, compare=False, repr=False)


def _refusal(accelerator: Accelerator, model: torch.nn.Module) -> str | None:
    """Why the fused path would not be exact for this model and setup, or None."""
    kind = accelerator.distributed_type
    fsdp = accelerator.state.fsdp_plugin if kind == DistributedType.FSDP else None
    if fsdp is not None and fsdp.fsdp_version != 2:
        return "FSDP1 shards the lm_head weight outside the forward (FSDP2 keeps it: fsdp.yaml)"
    plugin = accelerator.state.deepspeed_plugin
    if kind == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3 shards the lm_head weight outside the forward"
    head = model.get_output_embeddings()  # type: ignore[operator]
    if type(head) is not torch.nn.Linear:
        return f"the output head is {type(head).__name__}, not a plain Linear (LoRA on lm_head?)"
    if head.bias is not None:
        return "the output head has a bias"
    config = getattr(model, "config", None)
    for name in SCALED_LOGITS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            return f"the model config sets {name}={value}: its logits are not lm_head(h)"
    return _probe(model)


@torch.no_grad()
def _probe(model: torch.nn.Module) -> str | None:
    """lm_head(h) == logits on one 8-token forward (eval mode: no dropout, the RNG is untouched)."""
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()  # type: ignore[operator]
    weight = head.weight  # (V_s, H)
    ids = torch.arange(8, device=weight.device)[None] % weight.shape[0]  # (1, 8)
    out = model(input_ids=ids, output_hidden_states=True)
    model.train(was_training)
    weight = live_head(model, weight)  # FSDP2: the unsharded head the forward used
    logits = out.logits.float()  # (1, 8, V_s)
    mine = (out.hidden_states[-1] @ weight.T).float()  # (1, 8, V_s)
    tol = (1e-4 if weight.dtype == torch.float32 else 2e-2) * (1.0 + float(logits.abs().max()))
    err = float((mine - logits).abs().max())
    if err > tol:
        return f"lm_head(last hidden state) differs from the model's logits by {err:.2e}"
    return None


def choose_loss_path(requested: bool, accelerator: Accelerator, model: torch.nn.Module) -> LossPath:
    """The loss path for `model` (unwrapped, on its device). Call once, after `prepare`."""
    if not requested:
        head = LossPath(False, "off by request (--no-fused-loss)")
    else:
        why = _refusal(accelerator, model)
        head = LossPath(why is None, why or "chunked from hidden states, no (B, T, V) logits")
    if requested and not head.fused:
        logger.warning("fused loss off, training on full logits: %s", head.reason)
    else:
        logger.info("loss path: %s", head.reason)
    return head


def last_hidden(student: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T, H) final post-norm hidden states from the prepared model's own forward.

    An empty `logits_to_keep` index makes lm_head run on zero positions ((B, 0, V) logits);
    an int 0 would mean "all positions" in transformers.
    """
    no_positions = torch.empty(0, dtype=torch.long, device=batch.input_ids.device)
    out = student(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=no_positions,
    )
    return out.hidden_states[-1]  # (B, T, H): the state lm_head consumes (checked by _probe)


def live_head(student: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The lm_head weight the forward that just ran used. Under FSDP2 the parameter a loop holds
    is a DTensor shard; the root module keeps its head unsharded from its forward to its
    backward, and FSDP's post-backward reduce-scatters the gradient the loss adds to it with the
    rest (tests/test_fsdp_cpu.py: the same weights as one process). Elsewhere: `weight` itself."""
    if not isinstance(weight, DTensor):
        return weight
    model = getattr(student, "module", student)
    live = model.get_output_embeddings().weight  # type: ignore[operator]
    if isinstance(live, DTensor):
        raise RuntimeError("FSDP resharded the lm_head after the forward: use --no-fused-loss")
    return live


def topk_loss(
    student: torch.nn.Module,
    weight: torch.Tensor,
    batch: Batch,
    n_tokens: float,
    divergence: DivergenceSpec,
    vocab_size: int,
    *,
    measured: torch.Tensor | None = None,
    observe: RowObserver | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ mask·D / n_tokens to backward, Σ mask·D detached) against the batch's teacher top-k.

    The fused twin of `logits_loss.topk_divergence` summed over the mask and divided by n_tokens.
    `measured` (B, T) with `observe`: also hand those positions' logits to `observe`, chunk by
    chunk (a measured row without loss gets token weight 0): the loop's diagnostics.
    """
    h, _, mask, t_ids, t_lp = next_token_view(last_hidden(student, batch), batch)  # (B, T-1, H)
    weight = live_head(student, weight)
    assert t_ids is not None and t_lp is not None, "this batch carries no teacher top-k"
    shown = measured[:, 1:].to(mask.device) if measured is not None else torch.zeros_like(mask)
    rows = mask | shown  # (B, T-1): only these rows go through the head
    teacher = TeacherTopK(t_ids[rows], t_lp[rows])  # (N, K) each
    token_weight = mask[rows].float() / n_tokens  # (N,)
    shown_rows = shown[rows]  # (N,)

    def chunk(logits: torch.Tensor, start: int, stop: int) -> None:
        assert observe is not None
        ids, lp = teacher.ids[start:stop], teacher.logprobs[start:stop]
        observe(logits, ids, lp, shown_rows[start:stop])

    loss, values = fused_linear_divergence_sum(
        h[rows],
        weight,
        teacher,
        divergence.kind,
        token_weight,
        vocab_size=vocab_size,
        beta=divergence.beta,
        alpha=divergence.alpha,
        observe=chunk if observe is not None else None,
        workspace=workspace,
    )  # scalar, (N,)
    return loss, (values * mask[rows]).sum()


def ce_topk_loss(
    student: torch.nn.Module,
    weight: torch.Tensor,
    batch: Batch,
    n_tokens: float,
    vocab_size: int,
    *,
    kd_weight: float = 0.0,
    kd_divergence: Divergence = "forward_kl",
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ mask·(CE + kd_weight·KD) / n_tokens to backward, Σ mask·(CE + kd·KD), Σ mask·CE).

    The fused twin of the off-policy micro-batch loss. Cross-entropy is -k1 with a teacher
    log-prob of 0: k1 = log p_s(x) - 0 exactly, so CE = -k1 and its token weight is -mask / n.
    KD (kd_weight > 0) is a second pass over the same rows against the teacher's top-k.
    """
    h, targets, mask, t_ids, t_lp = next_token_view(last_hidden(student, batch), batch)
    weight = live_head(student, weight)
    rows = h[mask]  # (N, H): response targets only
    x = targets[mask]  # (N,) the token each row predicts
    sampled = TeacherSampled(x, torch.zeros(x.shape, device=x.device))  # log p_t(x) := 0
    minus_w = torch.full(x.shape, -1.0 / n_tokens, device=x.device)  # (N,)
    loss, k1 = fused_linear_divergence_sum(
        rows, weight, sampled, "k1", minus_w, vocab_size=vocab_size, workspace=workspace
    )
    ce = -k1.sum()
    total = ce
    if kd_weight > 0:
        assert t_ids is not None and t_lp is not None, "kd_weight > 0 needs the teacher's top-k"
        kd_w = torch.full(x.shape, kd_weight / n_tokens, device=x.device)  # (N,)
        kd_teacher = TeacherTopK(t_ids[mask], t_lp[mask])  # (N, K)
        kd_loss, kd = fused_linear_divergence_sum(
            rows,
            weight,
            kd_teacher,
            kd_divergence,
            kd_w,
            vocab_size=vocab_size,
            workspace=workspace,
        )
        loss = loss + kd_loss
        total = ce + kd_weight * kd.sum()
    return loss, total, ce


def policy_gradient_loss(
    student: torch.nn.Module,
    weight: torch.Tensor,
    batch: Batch,
    advantages: torch.Tensor,
    n_tokens: float,
    vocab_size: int,
    *,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ mask·A·(-log π(y_t)) / n_tokens to backward, Σ mask·A·(-log π(y_t)) detached).

    The fused twin of the RL loop's logits path; `advantages` (B,) is one value per sequence.
    As in `ce_topk_loss`, -log π(x) is -k1 against a teacher log-prob of 0, so a token's weight
    is -A / n_tokens.
    """
    h, targets, mask, _, _ = next_token_view(last_hidden(student, batch), batch)
    weight = live_head(student, weight)
    rows = h[mask]  # (N, H): sampled response tokens only
    x = targets[mask]  # (N,)
    adv = advantages.float()[:, None].expand(mask.shape)[mask]  # (N,): its sequence's advantage
    sampled = TeacherSampled(x, torch.zeros(x.shape, device=x.device))  # log p_t(x) := 0
    loss, k1 = fused_linear_divergence_sum(
        rows, weight, sampled, "k1", -adv / n_tokens, vocab_size=vocab_size, workspace=workspace
    )  # k1 = log π(x)
    return loss, -(adv * k1).sum()
