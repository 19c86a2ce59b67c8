#!/usr/bin/env bash
# Issue 4 acceptance: SmolLM2-135M quantized with kashin at 2 and 3 bits, LoRA-repaired on the
# Austen training files (cross-entropy vs distillation, default vs residual init) and evaluated
# on persuasion.txt (16 x 2048 windows, no BOS) before and after.
# Usage: bash eval/finetune_recovery.sh MODEL AUSTEN_DIR OUT_ROOT [STEPS]
set -euo pipefail
model=$1; austen=$2; root=$3; steps=${4:-150}
train=(--data "$austen/emma.txt" --data "$austen/mansfieldpark.txt" --data "$austen/sensesensibility.txt"
       --data "$austen/northangerabbey.txt" --data "$austen/prideprejudice.txt")
for bits in 2 3; do
  python -m quantune quantize "$model" --bits $bits --out "$root/k$bits" --no-eval --overwrite
  for objective in ce kd; do
    for init in default residual; do
      python -m quantune finetune "$root/k$bits" "${train[@]}" --eval-data "$austen/persuasion.txt" --eval-windows 16 \
        --eval-seq-len 2048 --seq-len 512 --batch-size 16 --steps "$steps" --lr 1e-3 --schedule wsd \
        --warmup-steps 10 --lora-r 16 --lora-alpha 32 --objective $objective --init $init \
        --teacher "$model" --out "$root/k$bits-$objective-$init"
    done
  done
done
