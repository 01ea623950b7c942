"""LoRA in the trainers: only adapters train, checkpoints are plain merged models, resume is exact,
and mismatched resumes are refused."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill import adapters
from distill.accounting import GpuLedger
from distill.errors import DistillError
from distill.offpolicy import train as offpolicy
from distill.onpolicy import train as onpolicy
from distill.prompts import embedded_prompts
from distill.rundir import record_config
from students import lora
from students.presets import StudentError
from teachers.hf import HFTeacher
from tests.conftest import TinyPair
from tests.test_offpolicy_train import Recorder, config, write_data

pytest.importorskip("peft")

RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora_data")
    write_data(root, tiny_pair.tokenizer, 4)
    return root


def off_config(run_dir: Path, student: Path, data: Path, **kw: Any) -> offpolicy.Config:
    """test_offpolicy_train's tiny settings with LoRA on (rank RANK); `kw` overrides any field."""
    return config(run_dir, student, data, **{"lora_rank": RANK, **kw})


def wrapped_from_checkpoint(student: Path, ckpt: Path) -> PreTrainedModel:
    """The base, wrapped as the trainer wraps it, with the checkpoint's saved adapters."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    model = lora.wrap(base, lora.Config(rank=RANK))
    lora.load_adapter_state(model, state["lora"]["adapters"])
    return model.eval()


def test_offpolicy_lora_trains_only_adapters_and_saves_merged(
    tmp_path: Path, tiny_pair: TinyPair, data: Path
) -> None:
    summary = offpolicy.train(off_config(tmp_path, tiny_pair.student_dir, data), GpuLedger())
    ckpt = summary.checkpoint
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    saved = state["lora"]["adapters"]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(bool(v.abs().max() > 0) for k, v in saved.items() if ".lora_B." in k)  # B left 0
    # AdamW holds state for the adapters alone: the base was never a parameter it stepped.
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(saved)
    assert len(state["optimizer"]["state"]) == len(saved)
    base = load_file(tiny_pair.student_dir / "model.safetensors")
    merged = load_file(ckpt / "model.safetensors")
    assert merged.keys() == base.keys()  # plain names: no base_layer, no lora_
    targets = [k for k in base if k.rsplit(".", 2)[-2] in lora.QWEN3_LINEARS]
    assert targets and all(not torch.equal(merged[k], base[k]) for k in targets)
    for k in set(base) - set(targets):  # embeddings, norms, head: untouched by LoRA
        assert torch.equal(merged[k], base[k]), k
    # The checkpoint is exactly the original base plus the saved adapters: the training model's
    # base weights stayed frozen (a changed base would not be reproduced from the file on disk).
    wrapped = wrapped_from_checkpoint(tiny_pair.student_dir, ckpt)
    for k, v in lora.merged_state_dict(wrapped).items():
        if k in merged:
            torch.testing.assert_close(merged[k], v, atol=0, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ids = torch.randint(
        0, len(tiny_pair.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, wrapped(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_offpolicy_lora_resume_equals_an_uninterrupted_run(
    tmp_path: Path, tiny_pair: TinyPair, data: Path
) -> None:
    kw = {"steps": 4, "save_every": 2}
    whole = Recorder()
    offpolicy.train(
        off_config(tmp_path / "a", tiny_pair.student_dir, data, **kw), GpuLedger(), whole
    )
    cut = off_config(tmp_path / "b", tiny_pair.student_dir, data, **kw)
    with pytest.raises(KeyboardInterrupt):
        offpolicy.train(cut, GpuLedger(), Recorder(stop_at=3))  # dies before saving step 4
    resumed = Recorder()
    offpolicy.train(cut, GpuLedger(), resumed)
    assert sorted(resumed.metrics) == [3, 4]  # 2 steps straight, then 2 resumed
    for step in (3, 4):
        assert resumed.metrics[step]["loss"] == pytest.approx(whole.metrics[step]["loss"], abs=1e-7)
    ckpts = [tmp_path / r / "offpolicy" / "checkpoint" for r in ("a", "b")]
    a, b = (load_file(c / "model.safetensors") for c in ckpts)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    sa, sb = (torch.load(c / "trainer_state.pt", weights_only=True)["lora"] for c in ckpts)
    assert all(torch.allclose(sa["adapters"][k], sb["adapters"][k], atol=1e-6, rtol=0)
               for k in sa["adapters"])  # fmt: skip


def test_onpolicy_lora_resume_is_exact_and_checkpoints_merged(
    tmp_path: Path, tiny_pair: TinyPair
) -> None:
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    prompts = embedded_prompts(8, 0, "train")

    def config(run_dir: Path) -> onpolicy.Config:
        return onpolicy.Config(run_dir=run_dir, student=str(tiny_pair.student_dir), steps=4,
                               save_every=2, max_tokens=8, prompts_per_step=2, warmup_steps=1,
                               lr=1e-2, lora_rank=RANK)  # fmt: skip

    whole: list[float] = []
    onpolicy.train(config(tmp_path / "a"), teacher, prompts, GpuLedger(),
                   lambda _p, _s, _t, m: whole.append(m["loss"]))  # fmt: skip

    def killer(_p: str, step: int, _t: int, m: Any) -> None:
        if step == 3:
            raise KeyboardInterrupt  # between the checkpoints of steps 2 and 4

    with pytest.raises(KeyboardInterrupt):
        onpolicy.train(config(tmp_path / "b"), teacher, prompts, GpuLedger(), killer)
    resumed: list[float] = []
    onpolicy.train(config(tmp_path / "b"), teacher, prompts, GpuLedger(),
                   lambda _p, _s, _t, m: resumed.append(m["loss"]))  # fmt: skip
    assert resumed == whole[2:]
    ckpts = [tmp_path / r / "onpolicy" / "checkpoint" for r in ("a", "b")]
    a, b = (load_file(c / "model.safetensors") for c in ckpts)
    assert a.keys() == load_file(tiny_pair.student_dir / "model.safetensors").keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    wrapped = wrapped_from_checkpoint(tiny_pair.student_dir, ckpts[1])
    plain = AutoModelForCausalLM.from_pretrained(ckpts[1], dtype=torch.float32).eval()
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, wrapped(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_resuming_the_other_kind_or_on_a_changed_base_is_refused(
    tmp_path: Path, tiny_pair: TinyPair, data: Path
) -> None:
    full = off_config(tmp_path / "full", tiny_pair.student_dir, data, steps=1, lora_rank=0)
    offpolicy.train(full, GpuLedger())
    with pytest.raises(DistillError, match="written without LoRA and this run is with"):
        offpolicy.train(replace(full, steps=2, lora_rank=RANK), GpuLedger())
    student = tmp_path / "student"
    shutil.copytree(tiny_pair.student_dir, student)
    lora_run = off_config(tmp_path / "lora", student, data, steps=1)
    offpolicy.train(lora_run, GpuLedger())
    with pytest.raises(DistillError, match="written with LoRA and this run is without"):
        offpolicy.train(replace(lora_run, steps=2, lora_rank=0), GpuLedger())
    with pytest.raises(StudentError, match="same --lora-rank"):
        offpolicy.train(replace(lora_run, steps=2, lora_rank=RANK + 2), GpuLedger())
    # The base changes under the run (a retrained earlier stage): its adapters no longer apply.
    weights = load_file(student / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    from safetensors.torch import save_file

    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DistillError, match="base student changed since checkpoint"):
        offpolicy.train(replace(lora_run, steps=2), GpuLedger())


def test_bad_lora_settings_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert adapters.settings(0, None, 0) is None
    assert adapters.settings(8, None, 3) == lora.Config(rank=8, alpha=None, seed=3)
    with pytest.raises(DistillError, match="use 0 .full fine-tuning. or a positive rank"):
        adapters.settings(-1, None, 0)
    with pytest.raises(DistillError, match="--lora-alpha needs --lora-rank > 0"):
        adapters.settings(0, 16, 0)
    with pytest.raises(DistillError, match="not FSDP/DeepSpeed"):
        adapters.settings(8, None, 0, sharded=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(StudentError, match=r"pip install 'distill\[peft\]'"):
        adapters.settings(8, None, 0)
    assert not lora.is_wrapped(torch.nn.Linear(2, 2))  # plain models need no peft


def test_a_config_recorded_before_lora_existed_still_resumes(
    tmp_path: Path, tiny_pair: TinyPair, data: Path
) -> None:
    cfg = off_config(tmp_path, tiny_pair.student_dir, data, lora_rank=0)
    record_config(tmp_path, "offpolicy", cfg)
    import json

    path = tmp_path / "config.json"
    recorded = json.loads(path.read_text())
    for k in ("lora_rank", "lora_alpha"):
        del recorded["offpolicy"][k]  # as an older version wrote it
    path.write_text(json.dumps(recorded))
    record_config(tmp_path, "offpolicy", cfg)  # same run: accepted
    with pytest.raises(DistillError, match="changed: lora_rank"):
        record_config(tmp_path, "offpolicy", replace(cfg, lora_rank=RANK))


class FakeLLM:
    """Just enough of vllm.LLM for VLLMSampler.sync: records what would reach the engine."""

    def __init__(self) -> None:
        config = SimpleNamespace(dtype=torch.float32, get_vocab_size=lambda: 512)
        self.llm_engine = SimpleNamespace(model_config=config)
        self.packed: list[tuple[str, bytes, list[int], str]] = []

    def collective_rpc(self, fn: object, args: tuple[Any, ...]) -> None:
        self.packed = args[0]

    def reset_prefix_cache(self) -> None:
        pass


def test_vllm_sync_of_a_lora_student_sends_merged_weights(tiny_pair: TinyPair) -> None:
    from students.vllm_sampler import VLLMSampler

    base = AutoModelForCausalLM.from_pretrained(tiny_pair.student_dir, dtype=torch.float32)
    model = lora.wrap(base, lora.Config(rank=RANK))
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm = FakeLLM()
    VLLMSampler(llm, vocab_size=500, eos_id=1).sync(model)  # type: ignore[arg-type]
    sent = {
        name: torch.frombuffer(bytearray(raw), dtype=getattr(torch, dt)).reshape(shape)
        for name, raw, shape, dt in llm.packed
    }
    merged = lora.merged_state_dict(model)
    on_disk = load_file(tiny_pair.student_dir / "model.safetensors")
    assert sent.keys() == merged.keys() == on_disk.keys()  # the base's own names
    assert all(torch.equal(sent[k], merged[k]) for k in sent)
    assert any(not torch.equal(sent[k], on_disk[k]) for k in sent)  # the adapters are in
    after = model.state_dict()  # the training model itself was not merged in place
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
