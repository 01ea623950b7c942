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
