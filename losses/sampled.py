"""Sampled-token estimators of the reverse KL, for on-policy distillation (tinker-cookbook, Qwen3).

On-policy, the student samples x ~ p_s and the teacher scores only x: we know log p_s(x) and
log p_t(x), not the distributions. With d = log p_t(x) - log p_s(x) (so r = e^d = p_t/p_s):

    k1 = -d               unbiased for KL(p_s‖p_t); high variance; negative on many tokens.
    k2 = d² / 2           biased (≈ KL to second order when p_s ≈ p_t); never negative.
    k3 = (r - 1) - log r  unbiased (E_{p_s}[r] = 1) and never negative; low variance when p_s ≈ p_t.

What their gradients mean when used as a loss on fixed samples (x held, θ the student):
    ∇k1 = ∇log p_s(x): its expectation under p_s is 0. k1 is a value, not a loss: use -k1 as a
        per-token reward/advantage in a policy gradient (advantage · log p_s(x)), which gives
        ∇KL(p_s‖p_t) in expectation; that is what tinker-cookbook does.
    ∇k2 = -d ∇log p_s(x): expectation ∇KL(p_s‖p_t), exactly the reverse-KL gradient; the same
        gradient as k1-as-advantage.
    ∇k3 = (1 - r) ∇log p_s(x): expectation -Σ p_t ∇log p_s = ∇KL(p_t‖p_s), the *forward* KL
        gradient, though its value estimates the reverse KL (the GRPO "k3 penalty" pitfall).

Each function returns per-token values (B, T); masking and normalisation belong to the loop.
Inputs are log-probabilities of the sampled token, (B, T); they are computed in fp32.
"""

from typing import Literal

import torch

Estimator = Literal["k1", "k2", "k3"]
ESTIMATORS: tuple[Estimator, ...] = ("k1", "k2", "k3")


def k1(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor) -> torch.Tensor:
    """log p_s(x) - log p_t(x): unbiased reverse-KL estimate; use as an advantage, not a loss."""
    return student_logprob.float() - teacher_logprob.float()


def k2(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor) -> torch.Tensor:
    """½ (log p_s(x) - log p_t(x))²: biased value, exact reverse-KL gradient in expectation."""
    return 0.5 * (student_logprob.float() - teacher_logprob.float()).square()


def k3(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r, r = p_t(x)/p_s(x): unbiased, >= 0; its gradient is forward-KL's."""
    d = teacher_logprob.float() - student_logprob.float()
    return torch.expm1(d) - d  # expm1 keeps the r ≈ 1 case exact, where k3 ≈ d²/2


def estimator(
    kind: Estimator, student_logprob: torch.Tensor, teacher_logprob: torch.Tensor
) -> torch.Tensor:
    """Dispatch by name: (B, T) per-token estimates."""
    if kind == "k1":
        return k1(student_logprob, teacher_logprob)
    if kind == "k2":
        return k2(student_logprob, teacher_logprob)
    if kind == "k3":
        return k3(student_logprob, teacher_logprob)
    raise ValueError(f"unknown estimator {kind!r}; choose one of {ESTIMATORS}")


def estimator_value_and_grad(
    kind: Estimator, student_logprob: torch.Tensor, teacher_logprob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate, ∂estimate/∂log p_s(x)) in closed form, for the chunked path."""
    ls, lt = student_logprob.float(), teacher_logprob.float()
    if kind == "k1":
        return ls - lt, torch.ones_like(ls)
    if kind == "k2":
        return 0.5 * (ls - lt).square(), ls - lt
    if kind == "k3":
        d = lt - ls
        return torch.expm1(d) - d, -torch.expm1(d)
    raise ValueError(f"unknown estimator {kind!r}; choose one of {ESTIMATORS}")


def sampled_logprobs(
    student_logits: torch.Tensor, token_ids: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """log p_s(token) (B, T) over the real vocabulary, from logits (B, T, V_s) and ids (B, T).

    Ids < 0 mark positions without a token (padding) and get 0; an id >= vocab_size raises,
    because it means the sampler drew a padded head row that the loss cannot score.
    """
    if bool((token_ids >= vocab_size).any()):
        raise ValueError(
            f"sampled token id >= vocab_size={vocab_size}: the sampler drew a padded head row; "
            "mask logits beyond the tokenizer's length when sampling"
        )
    log_p = torch.log_softmax(student_logits[..., :vocab_size].float(), dim=-1)  # (B, T, V)
    present = token_ids >= 0
    picked = log_p.gather(-1, token_ids.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(present, picked, torch.zeros_like(picked))
