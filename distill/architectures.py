"""Qwen3's architectures as the planner and the FLOP tests need them: shapes from docs/facts.md and
the model cards, parameter counts computed from the shapes (checked against the published totals in
tests/test_plan.py)."""

from __future__ import annotations

from dataclasses import dataclass

from distill.errors import DistillError

VOCAB_ROWS = 151_936  # Qwen3 config.vocab_size (docs/facts.md)


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A Qwen3 model's shapes (docs/facts.md; hidden/intermediate sizes from the model cards)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    intermediate: int = 0  # dense MLP width (0 for MoE)
    experts: int = 0
    active_experts: int = 0
    expert_intermediate: int = 0
    tied: bool = False
    vocab_rows: int = VOCAB_ROWS
    published_total: float = 0.0  # parameters, as the Qwen3 report states them
    published_active: float = 0.0

    def _attention(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * q + 2 * self.hidden * kv + q * self.hidden + 2 * self.head_dim

    def _mlp(self, experts: int) -> int:
        if not self.experts:
            return 3 * self.hidden * self.intermediate
        router = self.hidden * self.experts
        return router + experts * 3 * self.hidden * self.expert_intermediate

    def params(self, active: bool = False) -> int:
        """Total (or active per token) parameter count, embeddings and norms included."""
        experts = self.active_experts if active else self.experts
        layer = self._attention() + self._mlp(experts) + 2 * self.hidden
        embeddings = self.vocab_rows * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden

    def matmul_params(self) -> int:
        """Active parameters in matrix products: not the norms' scales, nor an untied input
        embedding (a lookup)."""
        norms = self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden
        lookup = 0 if self.tied else self.vocab_rows * self.hidden
        return self.params(active=True) - norms - lookup

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim


def _dense(
    name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, tied: bool, total: float
) -> Architecture:
    return Architecture(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv,
        intermediate=inter,
        tied=tied,
        published_total=total,
        published_active=total,
    )


MODELS: dict[str, Architecture] = {
    "0.6B": _dense("Qwen3-0.6B", 28, 1024, 16, 8, 3072, True, 0.6e9),
    "1.7B": _dense("Qwen3-1.7B", 28, 2048, 16, 8, 6144, True, 1.7e9),
    "4B": _dense("Qwen3-4B", 36, 2560, 32, 8, 9728, True, 4.0e9),
    "8B": _dense("Qwen3-8B", 36, 4096, 32, 8, 12288, False, 8.2e9),
    "14B": _dense("Qwen3-14B", 40, 5120, 40, 8, 17408, False, 14.8e9),
    "32B": _dense("Qwen3-32B", 64, 5120, 64, 8, 25600, False, 32.8e9),
    "30B-A3B": Architecture(
        name="Qwen3-30B-A3B",
        layers=48,
        hidden=2048,
        heads=32,
        kv_heads=4,
        experts=128,
        active_experts=8,
        expert_intermediate=768,
        published_total=30.5e9,
        published_active=3.3e9,
    ),
    "235B-A22B": Architecture(
        name="Qwen3-235B-A22B",
        layers=94,
        hidden=4096,
        heads=64,
        kv_heads=4,
        experts=128,
        active_experts=8,
        expert_intermediate=1536,
        published_total=235e9,
        published_active=22e9,
    ),
}


def architecture(size: str) -> Architecture:
    key = size.removeprefix("Qwen3-").removeprefix("Qwen/Qwen3-")
    if key not in MODELS:
        raise DistillError(f"unknown model size {size!r}: use one of {', '.join(MODELS)}")
    return MODELS[key]
