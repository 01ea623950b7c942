"""The Qwen3 student sizes: architecture, hub ids, parameter counts, and training-step memory.

Architectures are those of the released config.json files (docs/facts.md; hidden and MLP widths
from the checkpoints): every size has head_dim 128, RMSNorm on q and k, no attention bias, RoPE
theta 1e6 and a 151,936-row head for 151,669 real ids. `preset_config` builds the transformers
config with no download; `count_params` instantiates it on the meta device (no memory) and counts,
which the tests compare with the published totals.

Memory of one training step (per device, no sharding) = weights + gradients + optimizer state +
activations. Bytes per parameter by precision:
    fp32        4 weights + 4 grads                      (+ fp32 optimizer state)
    bf16-mixed  2 bf16 weights + 2 grads + 4 fp32 master (+ fp32 optimizer state)  ZeRO's 16 B/param
    bf16        2 weights + 2 grads                      (+ bf16 optimizer state)
and AdamW keeps two states per trainable parameter (8-bit AdamW: one byte each), SGD none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PretrainedConfig, Qwen3Config, Qwen3MoeConfig

QWEN3_VOCAB_ROWS = 151_936  # head rows; the tokenizer has 151,669 ids (267 padded rows)
QWEN3_EOS, QWEN3_PAD = 151_645, 151_643  # <|im_end|>, <|endoftext|>


class StudentError(ValueError):
    """A student that cannot be used as asked; the message names the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class Preset:
    """One released Qwen3 size. `published_*` are the model cards' totals, in billions."""

    size: str
    layers: int
    hidden: int
    intermediate: int  # dense MLP width (MoE: unused, every layer is sparse)
    heads: int
    kv_heads: int
    head_dim: int = 128
    tie_embeddings: bool
    context: int  # tokens the model card states (4B and up: with YaRN scaling)
    experts: int = 0  # MoE: experts per layer
    active_experts: int = 0  # MoE: experts routed per token
    moe_intermediate: int = 0  # MoE: width of one expert's MLP
    published_params: float
    published_non_embedding: float
    published_active: float | None = None  # MoE only

    @property
    def hub_id(self) -> str:
        """The post-trained (hybrid thinking) checkpoint."""
        return f"Qwen/Qwen3-{self.size}"

    @property
    def base_hub_id(self) -> str:
        """The pre-trained checkpoint, before any post-training."""
        return f"Qwen/Qwen3-{self.size}-Base"

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


PRESETS: dict[str, Preset] = {
    p.size: p
    for p in (
        Preset(size="0.6B", layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8,
               tie_embeddings=True, context=32_768, published_params=0.6,
               published_non_embedding=0.44),
        Preset(size="1.7B", layers=28, hidden=2048, intermediate=6144, heads=16, kv_heads=8,
               tie_embeddings=True, context=32_768, published_params=1.7,
               published_non_embedding=1.4),
        Preset(size="4B", layers=36, hidden=2560, intermediate=9728, heads=32, kv_heads=8,
               tie_embeddings=True, context=131_072, published_params=4.0,
               published_non_embedding=3.6),
        Preset(size="8B", layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8,
               tie_embeddings=False, context=131_072, published_params=8.2,
               published_non_embedding=6.95),
        Preset(size="14B", layers=40, hidden=5120, intermediate=17408, heads=40, kv_heads=8,
               tie_embeddings=False, context=131_072, published_params=14.8,
               published_non_embedding=13.2),
        Preset(size="30B-A3B", layers=48, hidden=2048, intermediate=6144, heads=32, kv_heads=4,
               tie_embeddings=False, context=131_072, experts=128, active_experts=8,
               moe_intermediate=768, published_params=30.5, published_non_embedding=29.9,
               published_active=3.3),
    )
}  # fmt: skip


def find_preset(name: str) -> tuple[Preset, bool] | None:
    """(preset, is_base) for '8B', 'Qwen3-8B', 'Qwen/Qwen3-8B-Base', ... (any case), else None."""
    key = name.strip().removeprefix("Qwen/").removeprefix("qwen/")
    key = key.removeprefix("Qwen3-").removeprefix("qwen3-")
    base = key.lower().endswith("-base")
    key = key[: -len("-base")] if base else key
    for size, preset in PRESETS.items():
        if key.lower() == size.lower():
            return preset, base
    return None


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a StudentError listing the sizes."""
    found = find_preset(name)
    if found is None:
        raise StudentError(
            f"unknown Qwen3 size {name!r}: choose one of {', '.join(PRESETS)} "
            "(optionally with -Base), or pass a hub id or a local model folder"
        )
    return found[0]


def preset_config(preset: Preset) -> PretrainedConfig:
    """The transformers config of a size, as released (no download)."""
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    # max_position_embeddings 40,960 as released: 32,768 output tokens plus prompt room.
    if not preset.is_moe:
        return Qwen3Config(
            vocab_size=QWEN3_VOCAB_ROWS, hidden_size=preset.hidden,
            intermediate_size=preset.intermediate, num_hidden_layers=preset.layers,
            num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
            head_dim=preset.head_dim, max_position_embeddings=40_960, rms_norm_eps=1e-6,
            rope_parameters=rope, tie_word_embeddings=preset.tie_embeddings, attention_bias=False,
            bos_token_id=QWEN3_PAD, eos_token_id=QWEN3_EOS,
        )  # fmt: skip
    moe = Qwen3MoeConfig(
        vocab_size=QWEN3_VOCAB_ROWS, hidden_size=preset.hidden,
        intermediate_size=preset.intermediate, num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=40_960, rms_norm_eps=1e-6,
        rope_parameters=rope, tie_word_embeddings=preset.tie_embeddings, attention_bias=False,
        bos_token_id=QWEN3_PAD, eos_token_id=QWEN3_EOS,
        num_experts=preset.experts, num_experts_per_tok=preset.active_experts,
        moe_intermediate_size=preset.moe_intermediate, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True,
    )  # fmt: skip
    moe.head_dim = preset.head_dim  # not in Qwen3MoeConfig's signature; read by the model
    return moe


@dataclass(frozen=True, kw_only=True)
class ParamCount:
    total: int  # every distinct tensor (a tied head counts once)
    embedding: int  # input embedding + an untied output head
    active: int  # used per token: for MoE, only `active_experts` of the experts

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_params(config: PretrainedConfig) -> ParamCount:
    """Count by building the model on the meta device: shapes only, no memory, no download."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    total = embedding = experts = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # tied embeddings: one tensor, counted once
        seen.add(id(p))
        total += p.numel()
        if "embed_tokens" in name or "lm_head" in name:
            embedding += p.numel()
        if ".experts." in name or name.endswith(".experts"):
            experts += p.numel()
    n_experts = int(getattr(config, "num_experts", 0) or 0)
    routed = int(getattr(config, "num_experts_per_tok", 0) or 0)
    active = total - experts + (experts * routed // n_experts if n_experts else 0)
    return ParamCount(total=total, embedding=embedding, active=active)


def config_matmul_params(config: PretrainedConfig) -> int:
    """Parameters in matrix products per token (2·N FLOPs each, distill/accounting.py): every
    matrix on the meta device, less an untied input embedding (a lookup); MoE: active experts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    seen: set[int] = set()
    total = experts = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or p.dim() < 2:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name or name.endswith(".experts"):
            experts += p.numel()
    tied = head is not None and head.weight is emb.weight
    n_experts = int(getattr(config, "num_experts", 0) or 0)
    routed = int(getattr(config, "num_experts_per_tok", 0) or 0)
    active = total - experts + (experts * routed // n_experts if n_experts else 0)
    return active if tied else active - emb.weight.numel()


def folder_matmul_params(model: str | Path) -> int:
    """`config_matmul_params` of a local folder's config.json, or of a Qwen3 hub id; 0 unknown."""
    from transformers import AutoConfig

    if (Path(model) / "config.json").exists():
        return config_matmul_params(AutoConfig.from_pretrained(model))
    found = find_preset(str(model))
    return config_matmul_params(preset_config(found[0])) if found else 0


def lora_params(config: PretrainedConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable parameters LoRA adds: rank * (in + out) per targeted linear of a dense Qwen3."""
    d, hd = int(config.hidden_size), int(config.head_dim)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    mlp = int(config.intermediate_size)
    shapes = {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, mlp), "up_proj": (d, mlp), "down_proj": (mlp, d),
    }  # fmt: skip
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise StudentError(f"unknown LoRA target(s) {unknown}: choose from {', '.join(shapes)}")
    return int(config.num_hidden_layers) * sum(rank * sum(shapes[t]) for t in targets)


Precision = Literal["fp32", "bf16-mixed", "bf16"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16-mixed", "bf16")
OPTIMIZERS: tuple[Optimizer, ...] = ("adamw", "adamw8bit", "sgd")
# bytes per parameter: (weights, gradients, fp32 master copy, one optimizer state)
_BYTES: dict[Precision, tuple[int, int, int, int]] = {
    "fp32": (4, 4, 0, 4),
    "bf16-mixed": (2, 2, 4, 4),
    "bf16": (2, 2, 0, 2),
}
_STATES: dict[Optimizer, int] = {"adamw": 2, "adamw8bit": 2, "sgd": 0}


@dataclass(frozen=True, kw_only=True)
class StepMemory:
    """Bytes one training step holds on one device, by kind."""

    weights: int
    gradients: int
    optimizer: int  # master weights + optimizer states
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def activation_bytes(config: PretrainedConfig, tokens: int, precision: Precision) -> int:
    """Activations of a step over `tokens` tokens, with per-layer recomputation (checkpointing).

    Kept: each layer's input (L·T·d) and one layer's working set while it is recomputed
    (norms, q/k/v/o, the MLP's gate/up/product; flash attention stores no T×T scores), plus
    the logits in the compute dtype and their fp32 log-softmax and gradient (T·V·(b + 8)).
    The logits term is what a chunked fused loss removes.
    """
    b = 4 if precision == "fp32" else 2
    d, hd, L = int(config.hidden_size), int(config.head_dim), int(config.num_hidden_layers)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    moe_width = int(getattr(config, "moe_intermediate_size", 0) or 0)
    routed = int(getattr(config, "num_experts_per_tok", 0) or 0)
    mlp = moe_width * routed if moe_width else int(config.intermediate_size)
    layer = tokens * (6 * d + 3 * q + 4 * kv + 4 * mlp) * b
    logits = tokens * int(config.vocab_size) * (b + 8)
    return L * tokens * d * b + layer + logits


def step_memory(
    params: ParamCount,
    precision: Precision,
    optimizer: Optimizer,
    *,
    trainable: int | None = None,
    activations: int = 0,
) -> StepMemory:
    """Memory of one unsharded training step; `trainable` < total for LoRA (base frozen)."""
    w, g, master, state = _BYTES[precision]
    if optimizer == "adamw8bit":
        state = 1
    if trainable is None:  # full fine-tuning
        n_weights, n_train = params.total, params.total
    else:  # LoRA: the frozen base plus `trainable` adapter parameters
        n_weights, n_train = params.total + trainable, trainable
    return StepMemory(
        weights=n_weights * w,
        gradients=n_train * g,
        optimizer=n_train * (master + _STATES[optimizer] * state),
        activations=activations,
    )


def architecture_mismatch(config: PretrainedConfig, preset: Preset) -> str | None:
    """None when `config` has the preset's architecture, else the first differing field."""
    expected = preset_config(preset)
    fields = [
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
    ]  # fmt: skip
    fields += (
        ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
        if preset.is_moe
        else ["intermediate_size"]
    )
    for f in fields:
        got, want = getattr(config, f, None), getattr(expected, f)
        if got != want:
            return f"{f} is {got!r}, Qwen3-{preset.size} has {want!r}"
    return None


def identify(config: PretrainedConfig) -> Preset | None:
    """The preset whose architecture `config` has, if any."""
    return next((p for p in PRESETS.values() if architecture_mismatch(config, p) is None), None)
