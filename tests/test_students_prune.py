"""`distill students prune`: a depth-pruned copy keeps the first LAYERS-1 layers and the last."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli import app
from students.prune import kept_layers
from tests.conftest import TinyPair


def test_kept_layers() -> None:
    assert kept_layers(30, 6) == [0, 1, 2, 3, 4, 29]
    assert kept_layers(4, 1) == [3]


def test_prune_writes_a_loadable_copy_of_the_kept_layers(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["students", "prune", "--from", str(tiny_pair.teacher_dir),
                                      "--layers", "2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(out)
    source = tiny_pair.teacher
    assert pruned.config.num_hidden_layers == 2 and len(source.model.layers) == 4
    for new, old in ((0, 0), (1, 3)):
        a, b = pruned.model.layers[new].state_dict(), source.model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert torch.equal(pruned.lm_head.weight, source.lm_head.weight)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tiny_pair.tokenizer.get_vocab()
    logits = pruned(torch.tensor([[1, 2, 3]])).logits  # (1, 3, V)
    assert torch.isfinite(logits).all()


def test_prune_refuses_a_depth_out_of_range(tiny_pair: TinyPair, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["students", "prune", "--from", str(tiny_pair.teacher_dir),
                                      "--layers", "4", "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 2 and "between 1 and 3" in result.output
    assert not (tmp_path / "x").exists()
