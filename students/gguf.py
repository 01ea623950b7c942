"""Export a GGUF checkpoint (as shipped on package indexes) to a plain transformers folder.

    python -c "from students.gguf import export; export('model.gguf', 'out/')"

transformers loads GGUF files (with the `gguf` package) and dequantises them to full precision,
but `save_pretrained` refuses a model loaded that way: its config still carries the GGUF
quantization settings. The folder written here (config.json, model.safetensors, tokenizer) loads
with a plain `from_pretrained`, trains, and serves under vLLM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def export(gguf_file: str | Path, out: str | Path) -> Path:
    """Write `gguf_file` as an fp32 safetensors folder at `out` (atomically); returns `out`."""
    src, out = Path(gguf_file), Path(out)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # GGUF's, not a quantization of the weights
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared tensors
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
