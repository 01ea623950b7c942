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


def require_peft() -> None:
    """Raise the install hint now, before a run records anything, if peft is missing."""
    _peft()


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
    adapted = {  # every Qwen3 target is a Linear
        f"{name}.weight": module
        for name, module in base.named_modules()
        if isinstance(module, peft.tuners.lora.Linear)
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        module = adapted.get(clean)
        if module is None:
            out[clean] = tensor  # shared with the training model, not copied
            continue
        # One layer's delta at a time: the merged weights are the only copy that accumulates
        # (computing every delta first held deltas and merged weights at once, 2x the targets).
        delta = module.get_delta_weight(module.active_adapters[0])  # (out, in)
        out[clean] = tensor + delta.to(tensor.dtype)
    return out


def is_wrapped(model: torch.nn.Module) -> bool:
    """True for a `wrap`ped student; False for a plain one, and wherever peft is not installed."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def plain_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The weights under the base model's own names: merged when LoRA-wrapped, else as they are.

    What a consumer that knows no peft (vLLM's `load_weights`, `from_pretrained`) must receive.
    """
    return merged_state_dict(model) if is_wrapped(model) else model.state_dict()


@torch.no_grad()
def merged_model(model: PreTrainedModel) -> PreTrainedModel:
    """A plain model (the base's class and config, no peft) holding the merged weights.

    Built on the meta device and given the merged tensors: weights outside the adapters are
    shared with the training model, not copied, and the training model is never modified
    (peft's own `merge_and_unload` would fold the adapters into it in place).
    """
    from transformers import AutoModelForCausalLM

    peft = _peft()
    if not isinstance(model, peft.PeftModel):
        raise StudentError("merged_model needs a LoRA-wrapped student (lora.wrap)")
    state = merged_state_dict(model)
    base_config = model.get_base_model().config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base_config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    return plain


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write a plain `from_pretrained` folder of the merged student (no peft needed to load)."""
    path.mkdir(parents=True, exist_ok=True)
    merged_model(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def base_probe(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A fingerprint of the frozen base: the first 16 values of every weight, by its plain name.

    Resuming adds the saved adapters to a base loaded afresh; a base that changed on disk since
    (a retrained previous stage) would silently give another model. Comparing probes catches it
    without hashing every weight.
    """
    peft = _peft()
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return {
        key.replace(".base_layer.", "."): tensor.detach().flatten()[:16].float().cpu().clone()
        for key, tensor in base.state_dict().items()
        if ".lora_" not in key
    }


def adapter_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The adapters alone (A and B of every layer): what a resume needs on top of the base."""
    return dict(_peft().get_peft_model_state_dict(model))


def load_adapter_state(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Put saved adapters back into a freshly wrapped base (same Config)."""
    own = adapter_state(model)
    differ = sorted(
        k
        for k in own.keys() | state.keys()
        if k not in own or k not in state or own[k].shape != state[k].shape
    )
    if differ:
        raise StudentError(
            f"saved adapters do not fit this student ({differ[:3]}...): resume with the "
            "same --lora-rank and targets as the run that wrote them"
        )
    _peft().set_peft_model_state_dict(model, state)
