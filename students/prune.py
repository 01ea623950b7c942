"""Depth pruning: a student made of a model's own layers (Minitron-style initialisation).

    distill students prune --from ./teacher --layers 8 --out ./student

Keeps the first `layers - 1` decoder layers and the last one, with the embeddings, final norm and
head unchanged, so the pruned model starts close to its source (the last layer maps into the
head's space) and shares its tokenizer and chat template exactly: a real strong->weak pair from
one model. Minitron (Muralidharan et al. 2024) prunes contiguous blocks and then distils.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from students.presets import StudentError

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def kept_layers(total: int, layers: int) -> list[int]:
    """Indices of the layers a `layers`-deep copy of a `total`-deep model keeps."""
    if not 1 <= layers < total:
        raise StudentError(
            f"--layers {layers}: a pruned copy keeps between 1 and {total - 1} of the source's "
            f"{total} layers: pick a value in that range"
        )
    return [*range(layers - 1), total - 1]


def prune(source: str | Path, layers: int, out: str | Path) -> Path:
    """Write a `layers`-deep copy of the model at `source` to `out`; returns `out`."""
    source, out = Path(source), Path(out)
    if not (source / "config.json").exists():
        raise StudentError(f"--from {source}: not a model folder (no config.json): pass one")
    config = AutoConfig.from_pretrained(source)
    total = int(config.num_hidden_layers)
    keep = kept_layers(total, layers)
    new_index = {old: new for new, old in enumerate(keep)}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    state = {}
    for name, tensor in model.state_dict().items():
        m = _LAYER.match(name)
        if m is None:
            state[name] = tensor
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    pruned_config = copy.deepcopy(model.config)
    pruned_config.num_hidden_layers = layers
    layer_types = getattr(pruned_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:  # per-layer attention kinds
        pruned_config.layer_types = [layer_types[i] for i in keep]
    pruned = AutoModelForCausalLM.from_config(pruned_config, dtype=torch.float32)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(pruned_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise StudentError(
            f"{source}: pruning left weights unmatched (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}): this architecture does not name its decoder "
            "layers '<prefix>.layers.<i>.'"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pruned.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
