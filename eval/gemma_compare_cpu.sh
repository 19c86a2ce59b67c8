#!/usr/bin/env bash
# The second-model comparison on the CPU (transformers >= 5.24 tokenizes this GGUF correctly;
# 5.17, the GPU machine's, does not -- see eval/results/notes.md): gemma-3-270m on Python's
# docs, 4 x 2048 windows with BOS, every method at 3, 2 and 4 bits.
set -euo pipefail
rtn() { local b=$1; echo "rtn-$b-sym,rtn-$b-asym,rtn-$b-sym-g128,rtn-$b-asym-g128,rtn-$b-sym-g64,rtn-$b-asym-g64,rtn-$b-sym-g32,rtn-$b-asym-g32"; }
run() {
  python -m eval.compare --model gemma3-270m --data builtin --windows 4 --device cpu --models-per-pass 8 \
    --methods "$2" --out "eval/results/compare_gemma3_builtin_cpu_$1"
}
run 3bit "kashin-3,kashin-3-g256,kashin-3.5,hqq-3-g128,hqq-3-g64,$(rtn 3)"
run 2bit "kashin-2,kashin-2-g128,kashin-2.5,hqq-2-g128,hqq-2-g64,$(rtn 2)"
run 4bit "kashin-4,kashin-4-g256,kashin-4.5,bnb-nf4,bnb-nf4-dq,bnb-fp4,bnb-fp4-dq,hqq-4-g128,hqq-4-g64,$(rtn 4)"
