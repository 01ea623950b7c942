"""Optional LoRA students through `peft` (the `peft` extra): train adapters, export merged weights.

The base stays frozen; each targeted linear W gains scale·B·A with A (r, in), B (out, r), B = 0
at start so the wrapped student starts exactly as the base. Checkpoints are written merged
(W + scale·B·A in the base's names), so evaluation, vLLM and `from_pretrained` load them with no
peft; resuming needs the base plus `adapter_state`, never the merged weights (that would add the
update twice).

    student = lora.wrap(student, lora.Config(rank=16))
    ... train ...
    lora.save_merged(student, tokenizer, run_dir / "export")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from students.presets import StudentError

QWEN3_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class Config:
    rank: int
    alpha: int | None = None  # scale = alpha / rank; None means alpha = 2·rank (scale 2)
    dropout: float = 0.0
    targets: tuple[str, ...] = QWEN3_LINEARS
    seed: int = 0  # initialises A; B starts at zero

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise StudentError(f"--lora-rank must be a positive integer, got {self.rank}")


def _peft():  # noqa: ANN202  (the module; imported lazily: peft is an optional extra)
    try:
        import peft
    except ImportError:
        raise StudentError(
            "LoRA needs the peft package: pip install 'distill[peft]' (or pip install peft)"
        ) from None
    return peft


def wrap(model: PreTrainedModel, config: Config) -> PreTrainedModel:
    """The model with trainable LoRA adapters on `config.targets`; everything else frozen."""
    peft = _peft()
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.targets if t not in present]
    if missing:
        raise StudentError(
            f"LoRA targets {missing} are not modules of this student: choose from "
            f"{', '.join(t for t in QWEN3_LINEARS if t in present)}"
        )
    lora_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else 2 * config.rank,
        lora_dropout=config.dropout,
        target_modules=list(config.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        wrapped = peft.get_peft_model(model, lora_config)
    return wrapped  # type: ignore[no-any-return]  (a PeftModel forwards like the base)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merged_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The base's state dict with every adapter folded in (W + scale·B·A), peft names removed."""
    peft = _peft()
    if not isinstance(model, peft.PeftModel):
        raise StudentError("merged_state_dict needs a LoRA-wrapped student (lora.wrap)")
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):  # every Qwen3 target is a Linear
            adapter = module.active_adapters[0]
            deltas[f"{name}.weight"] = module.get_delta_weight(adapter)  # (out, in)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = tensor + deltas[clean].to(tensor.dtype) if clean in deltas else tensor
    return out


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write a plain `from_pretrained` folder of the merged student (no peft needed to load)."""
    from transformers import AutoModelForCausalLM

    peft = _peft()
    assert isinstance(model, peft.PeftModel)
    state = merged_state_dict(model)
    base_config = model.get_base_model().config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base_config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    path.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def adapter_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The adapters alone (A and B of every layer): what a resume needs on top of the base."""
    return dict(_peft().get_peft_model_state_dict(model))


def load_adapter_state(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Put saved adapters back into a freshly wrapped base (same Config)."""
    result = _peft().set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise StudentError(
            f"saved adapters do not fit this student ({unexpected[:3]}...): resume with the "
            "same --lora-rank and targets as the run that wrote them"
        )
