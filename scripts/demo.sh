#!/usr/bin/env bash
# Set up (if needed), then quantize the built-in SmolLM2-135M to 4 bits with kashin and
# evaluate it on the built-in text (Python's bundled documentation), then let it continue a prompt. No network needed
# beyond the package registries. Output: out/smollm2-k4/ (report.md, eval_report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/quantune quantize smollm2-135m --bits 4 --out out/smollm2-k4 --overwrite --eval-windows 8
.venv/bin/quantune eval out/smollm2-k4 --data builtin --windows 8 --reference smollm2-135m
.venv/bin/quantune generate out/smollm2-k4 --prompt "The capital of France is" --max-new-tokens 32
