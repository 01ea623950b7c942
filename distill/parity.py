"""Pair checks before any training: template parity, logprob parity, and the pair's divergence.

`distill teacher check` runs these on the user's own prompts (or a few generic conversations)
and reports numbers rather than a yes/no:
- template parity: teacher and student render every conversation to the same ids in every mode
  of the template's format (system prompts a template injects included);
- logprob parity: the teacher backend (vLLM, a server) against transformers on the same ids, at a
  tolerance that follows the dtype (fp32 kernels differ by ~1e-4 on a real 1.5B model);
- alignment: KL(teacher‖teacher as student) = 0 on the backend's top-k;
- the pair: KL(teacher‖student) per token and top-1 agreement on the teacher's continuations,
  the gap distillation will close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from losses import forward_kl, topk_support
from students.sample import SamplingParams
from teachers.chat import (
    FORMAT_MODES,
    Message,
    detect_format,
    render_prompt,
    template_mismatch,
    vocab_mismatch,
)
from teachers.protocol import Teacher

# Generic conversations: a system prompt, a multi-turn history, short and open answers.
GENERIC_CONVERSATIONS: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "Explain in two sentences why the sky is blue."},),
    ({"role": "user", "content": "Write a haiku about autumn leaves."},),
    (
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "List three uses of a paperclip."},
    ),
    (
        {"role": "user", "content": "What is 17 times 3?"},
        {"role": "assistant", "content": "17 times 3 is 51."},
        {"role": "user", "content": "And half of that?"},
    ),
)

# Text whose ids must agree: ASCII, digits (Qwen splits them one by one), whitespace runs,
# non-Latin scripts, emoji, code, and the chat/think markers inside running text.
PROBE_TEXTS = (
    "What is 12 + 30? Answer briefly.",
    "  3.14159 * 2 = 6.28318\n\n\n",
    "naïve café – 東京 Привет 🙂",
    "def f(x):\n\treturn x ** 2  # square",
    "<think>\nstep one\n</think>\n\nThe answer is \\boxed{42}.<|im_end|>",
)
NAMED_SPECIALS = ("eos_token", "pad_token", "bos_token", "unk_token")

# Largest |logprob| difference accepted between two backends computing in this dtype. fp32: the
# two stacks sum in different orders (measured ~1e-4 at top-k on a 1.5B model); bf16 keeps 8 bits
# of mantissa, so logprobs of a few nats differ in the second decimal.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 2e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 1e-1,
}


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    conversations: int
    modes: tuple[str, ...]
    tokens: int  # continuation tokens compared
    max_actual_diff: float  # max |logprob| difference of the actual tokens, backend vs reference
    max_topk_diff: float  # same over the top-k entries
    same_ids: float  # share of top-k ids equal in rank order
    self_kl: float  # mean KL(teacher‖teacher as student) per token: 0 if aligned
    pair_kl: float  # mean KL(teacher‖student) per token over the teacher's top-k + tail
    top1_agreement: float  # share of positions where the student's argmax is the teacher's top-1


def tokenizer_mismatch(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]] = GENERIC_CONVERSATIONS,
) -> str | None:
    """None when the student tokenizes and renders exactly as the teacher, else the first
    difference: the vocabulary, the named special tokens, plain text, then each conversation in
    every mode of the template's format. The one tokenizer-parity check of the project."""
    if diff := vocab_mismatch(teacher_tok, student_tok):
        return f"tokenizers differ: {diff}"
    for attr in NAMED_SPECIALS:
        t, s = getattr(teacher_tok, attr), getattr(student_tok, attr)
        t_id, s_id = getattr(teacher_tok, f"{attr}_id"), getattr(student_tok, f"{attr}_id")
        if (t, t_id) != (s, s_id):
            return (
                f"tokenizers differ: {attr} is {t!r} (id {t_id}) in the teacher, {s!r} "
                f"(id {s_id}) in the student"
            )
    for text in PROBE_TEXTS:
        t_ids = teacher_tok.encode(text, add_special_tokens=False)
        s_ids = student_tok.encode(text, add_special_tokens=False)
        if t_ids != s_ids:
            return f"tokenizers differ: {text!r} is {t_ids} in the teacher, {s_ids} in the student"
    for conv in conversations:
        if diff := template_mismatch(teacher_tok, student_tok, conv):
            return f"templates render differently: {diff}"
    return None


def check_conversations(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]] = GENERIC_CONVERSATIONS,
) -> list[list[Message]]:
    """`conversations`, once the pair passes `tokenizer_mismatch` on them, or an error: a
    mismatch silently biases every divergence between the two."""
    if diff := tokenizer_mismatch(teacher_tok, student_tok, conversations):
        raise DistillError(
            f"teacher and student {diff}; distil only into a student that shares the teacher's "
            "tokenizer and chat template (tokenizer_config.json / chat_template.jinja)"
        )
    return [list(c) for c in conversations]


@torch.no_grad()
def logprob_parity(
    backend: Teacher,
    reference: Teacher,
    reference_model: PreTrainedModel,
    student_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    top_k: int,
    max_tokens: int = 16,
) -> ParityReport:
    """Score the backend's greedy continuations with both teachers and the student; compare."""
    modes = FORMAT_MODES[detect_format(tokenizer)]
    prompts = [
        render_prompt(tokenizer, c, modes[i % len(modes)]) for i, c in enumerate(conversations)
    ]
    gens = backend.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    seqs = [[*p, *g.token_ids.tolist()] for p, g in zip(prompts, gens, strict=True)]
    plens = [len(p) for p in prompts]
    got = backend.score(seqs, plens, top_k)
    ref = reference.score(seqs, plens, top_k)
    pairs = list(zip(got, ref, strict=True))
    self_kls, pair_kls, agree = [], [], []
    vocab = len(tokenizer)
    for s, P, sc in zip(seqs, plens, got, strict=True):
        if len(s) <= P:
            continue
        ids, lps = torch.from_numpy(sc.ids), torch.from_numpy(sc.logprobs)  # (L, K)
        x = torch.tensor([s])
        t_logits = reference_model(x).logits[0, P - 1 : len(s) - 1]  # (L, W)
        # Normalised over the full head width, as the teacher's logprobs are: this checks
        # alignment and ids exactly (a training student masks the padded rows instead).
        log_s, log_t = topk_support(t_logits, ids, lps, backend.logits_width)
        self_kls.append(forward_kl(log_s, log_t))  # (L,)
        s_logits = student_model(x).logits[0, P - 1 : len(s) - 1].float()  # (L, V_s)
        log_s, log_t = topk_support(s_logits, ids, lps, vocab)  # as training sees it
        pair_kls.append(forward_kl(log_s, log_t))  # (L,)
        agree.append(s_logits[:, :vocab].argmax(-1) == ids[:, 0])  # (L,)
    return ParityReport(
        conversations=len(conversations),
        modes=tuple(modes),
        tokens=sum(len(a) for a in agree),
        max_actual_diff=max(
            float(np.abs(a.actual_logprobs - b.actual_logprobs).max(initial=0.0)) for a, b in pairs
        ),
        max_topk_diff=max(
            float(np.abs(a.logprobs - b.logprobs).max(initial=0.0)) for a, b in pairs
        ),
        same_ids=float(np.mean([(a.ids == b.ids).mean() for a, b in pairs])),
        self_kl=float(torch.cat(self_kls).mean()) if self_kls else 0.0,
        pair_kl=float(torch.cat(pair_kls).mean()) if pair_kls else 0.0,
        top1_agreement=float(torch.cat(agree).float().mean()) if agree else float("nan"),
    )
