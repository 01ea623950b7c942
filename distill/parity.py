"""Teacher checks before any training: template parity, logprob parity, and KL(teacher‖teacher) = 0.

A mismatch here silently biases every KL later, so `distill teacher check` runs these on a few
task conversations and reports numbers rather than a yes/no.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.tasks import problems, response_text
from losses import forward_kl, topk_support
from teachers.chat import MODES, Message, render_prompt, template_mismatch, vocab_mismatch
from teachers.protocol import SamplingParams, Teacher


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    conversations: int
    max_actual_diff: float  # max |logprob| difference of the actual tokens, backend vs reference
    max_topk_diff: float  # same over the top-k entries
    same_ids: float  # share of top-k ids equal in rank order
    self_kl: float  # mean KL(teacher‖teacher as student) per token: 0 if aligned


def check_conversations(
    teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase, n: int
) -> list[list[Message]]:
    """Task conversations both tokenizers render identically in both modes, or an error."""
    if diff := vocab_mismatch(teacher_tok, student_tok):
        raise DistillError(
            f"teacher and student tokenizers differ: {diff}; distil into a student that "
            "shares the teacher's tokenizer"
        )
    probs = problems(n, seed=0, split="check")
    convs = [[{"role": "user", "content": p.prompt}] for p in probs]
    # A finished thinking turn, then a new question: the template's history rules and the
    # thinking prefix of the last turn are compared, not only the generation prompt.
    convs.append(
        [
            *convs[0],
            {"role": "assistant", "content": response_text(probs[0], True)},
            {"role": "user", "content": probs[-1].prompt},
        ]
    )
    for conv in convs:
        if diff := template_mismatch(teacher_tok, student_tok, conv):
            raise DistillError(f"teacher and student templates render differently: {diff}")
    return convs


@torch.no_grad()
def logprob_parity(
    backend: Teacher,
    reference: Teacher,
    reference_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    top_k: int,
) -> ParityReport:
    """Score the same greedy continuations with both teachers and compare; then KL(t‖t)."""
    prompts = [render_prompt(tokenizer, c, MODES[i % 2]) for i, c in enumerate(conversations)]
    gens = backend.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    seqs = [[*p, *g.token_ids.tolist()] for p, g in zip(prompts, gens, strict=True)]
    plens = [len(p) for p in prompts]
    got = backend.score(seqs, plens, top_k)
    ref = reference.score(seqs, plens, top_k)
    pairs = list(zip(got, ref, strict=True))
    kls = []
    for s, P, sc in zip(seqs, plens, got, strict=True):
        logits = reference_model(torch.tensor([s])).logits[0, P - 1 : len(s) - 1]  # (L, W)
        # Normalised over the full head width, as the teacher's logprobs are: this checks
        # alignment and ids exactly (a training student masks the padded rows instead).
        log_s, log_t = topk_support(
            logits, torch.from_numpy(sc.ids), torch.from_numpy(sc.logprobs), backend.logits_width
        )
        kls.append(forward_kl(log_s, log_t))  # (L,)
    return ParityReport(
        conversations=len(conversations),
        max_actual_diff=max(
            float(np.abs(a.actual_logprobs - b.actual_logprobs).max(initial=0.0)) for a, b in pairs
        ),
        max_topk_diff=max(
            float(np.abs(a.logprobs - b.logprobs).max(initial=0.0)) for a, b in pairs
        ),
        same_ids=float(np.mean([(a.ids == b.ids).mean() for a, b in pairs])),
        self_kl=float(torch.cat(kls).mean()) if kls else 0.0,
    )
