#!/usr/bin/env bash
# The second-model comparison (issue 3): gemma-3-270m (base) on Python's bundled docs
# (pydoc_data.topics), 16 x 2048 windows with BOS, every method at 4, 3 and 2 bits.
# Usage: bash eval/gemma_compare.sh MODEL DEVICE OUT_PREFIX   (MODEL: gemma3-270m or the .gguf path)
set -euo pipefail
model=${1:-gemma3-270m}; device=${2:-cuda}; out=${3:-eval/results/compare_gemma3_builtin}
rtn() { local b=$1; echo "rtn-$b-sym,rtn-$b-asym,rtn-$b-sym-g128,rtn-$b-asym-g128,rtn-$b-sym-g64,rtn-$b-asym-g64,rtn-$b-sym-g32,rtn-$b-asym-g32"; }
run() {
  python -m eval.compare --model "$model" --data builtin --windows 16 --device "$device" \
    --methods "$2" --out "${out}_$1"
}
run 4bit "kashin-4,kashin-4-g256,kashin-4.25,kashin-4.5,bnb-nf4,bnb-nf4-dq,bnb-fp4,bnb-fp4-dq,hqq-4-g128,hqq-4-g64,$(rtn 4)"
run 3bit "kashin-3,kashin-3-g256,kashin-3.25,kashin-3.5,hqq-3-g128,hqq-3-g64,$(rtn 3)"
run 2bit "kashin-2,kashin-2-g128,kashin-2.25,kashin-2.5,hqq-2-g128,hqq-2-g64,$(rtn 2)"
