"""Vocabulary hygiene: one real vocabulary, whatever the heads' widths.

Three sizes differ in practice: the tokenizer's length (Qwen3: 151,669 ids), the student's head
rows and the teacher's head rows (Qwen3: 151,936; Qwen2.5 7B+: 152,064). The rules:
- losses run over the real vocabulary only, ids [0, vocab_size): padded head rows are cut off
  before any softmax, never padded with zero logits (a zero logit still carries probability);
- teacher top-k ids >= vocab_size are dropped into the tail bucket;
- a head narrower than the vocabulary, or two tokenizers that map any token differently, is a
  different tokenizer and raises: a distillation signal across tokenizers is silently wrong.
"""

from collections.abc import Mapping

from losses.support import check_head


def shared_vocab_size(student_vocab: Mapping[str, int], teacher_vocab: Mapping[str, int]) -> int:
    """The real vocabulary size both sides share; ValueError if the tokenizers differ.

    Pass `tokenizer.get_vocab()` of each side (added tokens included). Qwen2.5 (151,665 ids)
    and Qwen3 (151,669: adds <think>, </think>, <tool_response>, </tool_response>) fail here.
    """
    if student_vocab == teacher_vocab:
        ids = sorted(student_vocab.values())
        if ids != list(range(len(ids))):
            raise ValueError("tokenizer ids are not contiguous from 0; cannot size the vocabulary")
        return len(ids)
    only_student = sorted(set(student_vocab) - set(teacher_vocab))[:3]
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:3]
    moved = sorted(
        t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t]
    )[:3]
    raise ValueError(
        f"student and teacher tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} "
        f"ids; only in student: {only_student}, only in teacher: {only_teacher}, different ids: "
        f"{moved}); pick a teacher and a student from one tokenizer family (e.g. Qwen3 with Qwen3)"
    )


def check_heads(vocab_size: int, student_rows: int, teacher_rows: int | None = None) -> None:
    """Both heads must cover the real vocabulary; extra (padded) rows are fine and ignored."""
    check_head("student", student_rows, vocab_size)
    if teacher_rows is not None:
        check_head("teacher", teacher_rows, vocab_size)
