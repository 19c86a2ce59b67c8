#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (slow and GPU tests are skipped;
# run them with: .venv/bin/python -m pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
