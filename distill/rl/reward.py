"""Verifiable rewards and GRPO's group-relative advantages.

Reward (distill.rl.train) = 1 for a correct final answer (`distill.offpolicy.filters.verify`, the
check the teacher data filters use: integers exactly, anything else with math-verify), plus
`format_weight` when the response is `well_formed` for its mode. Advantages are relative to
the other responses to the same prompt.
"""

from __future__ import annotations

import torch

from distill.tasks import extract_answer
from teachers.chat import Mode


def well_formed(text: str, mode: Mode) -> bool:
    """A thinking response closes its think block before the answer; both end in \\boxed{N}.

    `text` is the decoded response (special tokens skipped; `<think>` tags survive decoding).
    """
    if mode == "think" and text.count("</think>") != 1:
        return False
    return extract_answer(text) is not None


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True) -> torch.Tensor:
    """(P, G) rewards of G responses to each of P prompts -> (P, G) advantages.

    A_i = r_i - mean(r of its group), divided by the group's std when `scale_by_std` (GRPO);
    Dr. GRPO leaves the std out, since it up-weights prompts that are nearly always right or
    wrong. A group whose rewards are all equal carries no signal: its advantages are 0, not NaN.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if not scale_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=False)  # (P, 1)
    return torch.where(std > 0, centred / std.clamp(min=1e-6), torch.zeros_like(centred))
