#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (slow and GPU tests are skipped;
# run them with: .venv/bin/python -m pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core (pytest-xdist): the Triton interpreter's kernel tests are CPU-bound; PYTEST_WORKERS=0 runs serially
# --dist worksteal: an idle worker takes queued tests from a busy one (the interpreter's long cases otherwise
# leave one worker running alone at the end)
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist worksteal "$@"
