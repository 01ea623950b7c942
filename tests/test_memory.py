"""students.memory: freed heap blocks go back to the system (glibc), and sampling calls it."""

import resource
import sys

import pytest

from students import memory


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_freed_heap_blocks() -> None:
    # 3,000 blocks of 64 KB (below malloc's mmap threshold: they live in the heap), written so
    # their pages are resident; freeing all but the last leaves ~190 MB free inside the heap,
    # which free() does not return while the last block pins the heap's top.
    blocks = [bytearray(b"x" * 65536) for _ in range(3000)]
    pin = blocks[-1]
    del blocks
    held = rss_mb()
    assert memory.release_free_memory()
    released = held - rss_mb()
    assert released > 100, f"only {released:.0f} MB returned"
    assert len(pin) == 65536


def test_hf_sampler_releases_around_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    from students import sample as sample_module

    calls: list[str] = []
    monkeypatch.setattr(sample_module, "release_free_memory", lambda: calls.append("r") or True)
    monkeypatch.setattr(sample_module, "sample", lambda *a, **k: calls.append("s") or [])

    class Model:
        training = True

        def eval(self) -> None:
            self.training = False

        def train(self, mode: bool) -> None:
            self.training = mode

    model = Model()
    sampler = sample_module.HFSampler(model, eos_id=0, pad_id=0, vocab_size=8)  # type: ignore[arg-type]
    assert sampler.generate([[1]], sample_module.SamplingParams(temperature=1.0)) == []
    assert calls == ["r", "s", "r"]
    assert model.training


# --- which allocator: the `distill` command reruns itself on tcmalloc (students/memory.py) ---

RERUN_SNIPPET = (
    "import os\n"
    "print('pid', os.getpid(), flush=True)\n"
    "from cli import rerun_on_tcmalloc\n"
    "rerun_on_tcmalloc()\n"
    "from students import memory\n"
    "print('allocator', memory.allocator(), memory.release_free_memory())\n"
)


def rerun(env: dict[str, str]) -> list[str]:
    import os
    import subprocess

    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory.PRELOADED_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", RERUN_SNIPPET], env={**full, **env}, capture_output=True,
        text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.split("\n")


@pytest.mark.skipif(memory.find_tcmalloc() is None, reason="tcmalloc is not installed")
def test_command_reruns_itself_on_tcmalloc_in_the_same_process() -> None:
    lines = rerun({memory.MALLOC_ENV: "tcmalloc"})
    pids = [line for line in lines if line.startswith("pid ")]
    assert len(pids) == 2 and pids[0] == pids[1], lines  # exec'd once, the same pid
    assert "allocator tcmalloc True" in lines  # and tcmalloc's own release is the one called


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_system_choice_keeps_glibc() -> None:
    lines = rerun({memory.MALLOC_ENV: "system"})
    assert len([line for line in lines if line.startswith("pid ")]) == 1  # never exec'd
    assert "allocator glibc True" in lines


@pytest.fixture
def linux_with(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """preload_command on a Linux host whose GPU and tcmalloc library are as the test says."""

    def setup(*, gpu: bool, library: str | None) -> None:
        monkeypatch.setattr(memory.sys, "platform", "linux")
        monkeypatch.setattr(memory, "has_gpu", lambda: gpu)
        monkeypatch.setattr(memory, "find_tcmalloc", lambda: library)

    return setup


def test_preload_command_reruns_the_same_command_with_tcmalloc_first(linux_with) -> None:  # noqa: ANN001
    linux_with(gpu=False, library="/opt/libtcmalloc_minimal.so.4")
    env = {"LD_PRELOAD": "/opt/libiomp5.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "10"}
    rerun = memory.preload_command(env, ["py", "-c", "code", "onpolicy"], "/venv/python")
    assert rerun is not None
    argv, new_env = rerun
    assert argv == ["/venv/python", "-c", "code", "onpolicy"]
    assert new_env["LD_PRELOAD"] == "/opt/libtcmalloc_minimal.so.4:/opt/libiomp5.so"
    assert new_env[memory.PRELOADED_ENV] == "/opt/libtcmalloc_minimal.so.4"
    assert new_env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "10"  # the user's value is kept
    quiet = memory.preload_command({}, ["py"], "py")
    assert quiet is not None and quiet[1]["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 62)


@pytest.mark.parametrize(
    ("env", "gpu", "library"),
    [
        ({memory.MALLOC_ENV: "system"}, False, "libtcmalloc.so.4"),  # asked not to
        ({}, True, "libtcmalloc.so.4"),  # auto on a GPU host: host memory is not the limit there
        ({}, False, None),  # auto with none installed
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, False, "libtcmalloc.so.4"),  # user's choice
        ({memory.PRELOADED_ENV: "libtcmalloc.so.4"}, False, "libtcmalloc.so.4"),  # never twice
    ],
)
def test_preload_command_leaves_the_process_as_it_is(linux_with, env, gpu, library) -> None:  # noqa: ANN001
    linux_with(gpu=gpu, library=library)
    assert memory.preload_command(env, ["py"], "py") is None


def test_preload_command_asked_for_tcmalloc(linux_with) -> None:  # noqa: ANN001
    linux_with(gpu=True, library="libtcmalloc.so.4")  # explicit: on a GPU host too
    assert memory.preload_command({memory.MALLOC_ENV: "tcmalloc"}, ["py"], "py") is not None
    linux_with(gpu=False, library=None)
    with pytest.raises(ValueError, match="no tcmalloc is installed: apt install"):
        memory.preload_command({memory.MALLOC_ENV: "tcmalloc"}, ["py"], "py")
    with pytest.raises(ValueError, match="DISTILL_MALLOC=tcmaloc is unknown: use one of auto"):
        memory.preload_command({memory.MALLOC_ENV: "tcmaloc"}, ["py"], "py")


def test_unknown_choice_is_one_error_line() -> None:
    import os
    import subprocess

    env = {**os.environ, memory.MALLOC_ENV: "fast"}
    done = subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", "--help"], env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr == "error: DISTILL_MALLOC=fast is unknown: use one of auto, tcmalloc, system\n"
    )


# --- on glibc, a training forward trims the heap before each decoder layer ---


def tiny_model():  # noqa: ANN201
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    return Qwen3ForCausalLM(config)


def test_trim_each_layer_trims_in_training_forwards_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    trims: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: trims.append(pad) or 1)
    monkeypatch.setattr(memory, "allocator", lambda: "glibc")
    model = tiny_model()
    assert memory.trim_each_layer(model) == 3
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()
    out = model(input_ids=ids).logits
    assert trims == [0, 0, 0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, out.detach())  # hooks change no value
    assert len(trims) == 3  # sampling's decode steps would pay a trim per layer per token


def test_trim_each_layer_leaves_other_allocators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "allocator", lambda: "tcmalloc")
    assert memory.trim_each_layer(tiny_model()) == 0
