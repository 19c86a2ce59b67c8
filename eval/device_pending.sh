#!/usr/bin/env bash
# What the next device session should measure, in order of priority, each writing under $OUT.
# Assumes the set-up of the device notes: wheels in /tmp/site (PYTHONPATH), /tmp/smollm2.gguf
# and /tmp/austen (see ../shared/data/README.md). Usage: bash eval/device_pending.sh STEP
# Next session, in this order (one call each, each under about five minutes): gpu-tests, transforms, quantize, hold,
# defaults-rtn, defaults-kashin, kashin-groups, joined-decode, hold-generate (if hold wins). None of them ran in the
# twenty-sixth or twenty-seventh session (no device).
set -euo pipefail
out=${OUT:-/tmp/out}
case "$1" in
  gpu-tests) # issue 5: every GPU-marked test: the layer's CUDA paths against the CPU reference for eighteen formats
             # (1-16 tokens and prefill, bf16 / float16 / float32), q/k/v in one launch, CUDA-graph replay with new
             # inputs, quantizing on the GPU (tests/test_qlinear.py, written in the twenty-seventh session, not yet
             # run on a GPU), the fit's code-assignment kernel against the torch fit (tests/test_fit_kernels.py),
             # `quantune eval` and `quantize --device cuda` on the GPU against the CPU figures
             # (tests/test_cli.py), generation in graph and compiled modes (tests/test_generate.py)
             timeout 400 python -m pytest -q -m gpu -p no:cacheprovider tests/test_qlinear.py tests/test_fit_kernels.py tests/test_cli.py tests/test_finetune.py tests/test_generate.py \
               tests/test_launch.py > "$out/pytest_gpu.log" 2>&1 || true ;;
  transforms) # issue 5: kashin's input transforms, decode preparation and prefill, library against torch and the
             # copy bandwidth (the Hadamard kernel of the twenty-sixth session: before it, the torch transform)
             timeout 300 python -m eval.bench_transforms --out "$out/bench_transforms" > "$out/bench_transforms.log" 2>&1 || true
             # then a Hadamard model on the GPU: graph and compiled steps against the eager tokens and transformers'
             timeout 200 python -m pytest -q -m gpu tests/test_generate.py -k hadamard > "$out/pytest_gpu_hadamard.log" 2>&1 || true ;;
  hold)      # issue 5: kashin's two-pass GEMV keeping each row block's codes in registers for the second pass
             # (quantune.kernels.GEMV_HOLD, off: rows of at most four 128-word tiles, 4096 columns at 4 bits; 128
             # registers in Triton 3.6's sm_90 code against 84) against reading them again from L2, versions side by
             # side on the layers it serves (4096 columns: o, q/k/v joined, k/v, gate/up alone)
             sed 's/^GEMV_HOLD = False/GEMV_HOLD = True/' quantune/kernels.py > /tmp/kernels_hold.py
             OUT="$out/hold" timeout 330 python -m eval.ab_kernels /tmp/kernels_hold.py --methods kashin-4,kashin-2 \
               --shapes 4096x4096,4096x6144,4096x14336,4096x1024 --repeat 3 > "$out/hold.log" 2>&1 || true ;;
  hold-generate) # issue 5: kashin-4's 8B generation, compiled + CUDA graph, with GEMV_HOLD on (a copy of the tree)
             # against the tree (o and the joined q/k/v run two-pass GEMVs: HOLD serves them)
             rm -rf /tmp/alt && mkdir -p /tmp/alt && cp -r quantune eval /tmp/alt/
             sed -i 's/^GEMV_HOLD = False/GEMV_HOLD = True/' /tmp/alt/quantune/kernels.py
             (cd /tmp/alt && PYTHONPATH=/tmp/alt:${PYTHONPATH:-} timeout 280 python -m eval.bench_generate \
               --contenders kashin-4 --new-tokens 64 --compile --out "$out/bench_generate_hold_on") || true
             timeout 280 python -m eval.bench_generate --contenders kashin-4 --new-tokens 64 --compile \
               --out "$out/bench_generate_hold_off" || true ;;
  kernels)   python -m eval.bench_kernels --configs gemv5:2x1x128,gemv6:4x1x64,gemv6p:4x1x64,gemv6:2x1x128,gemv6:1x1x128,gemv6:8x1x64 \
               --out "$out/bench_kernels" ;;                                                       # issue 5
  defaults-rtn) # issue 5: the kernel bench at the library's own defaults, rtn (one scale a row). The twenty-sixth
             # session's single `defaults` call (rtn and kashin, ~460 s) lost its machine before returning: each half
             # is now its own call, well under the limit
             timeout 270 python -m eval.bench_kernels --methods rtn-4,rtn-2 --rtn-group row \
               --configs gemv6:4x1x64,gemv6:2x1x128,gemv6:1x1x128,gemv6:8x1x64 \
               --out "$out/bench_kernels_defaults_rtn" > "$out/bench_kernels_defaults_rtn.log" 2>&1 || true ;;
  defaults-kashin) # issue 5: the same for kashin per row (the one-pass planes rule of the twenty-fifth session)
             timeout 270 python -m eval.bench_kernels --methods kashin-4,kashin-2 --configs gemv5:2x1x128 \
               --out "$out/bench_kernels_defaults_kashin" > "$out/bench_kernels_defaults_kashin.log" 2>&1 || true ;;
  kashin-groups) # issue 5: kashin in groups of 128 and 64 at the library's defaults (group sums on since the twenty-fifth);
             # `kashin-groups 128` and `kashin-groups 64` as two calls keep each under four minutes
             for g in ${2:-128 64}; do
               timeout 200 python -m eval.bench_kernels --methods kashin-4,kashin-2 --kashin-group $g \
                 --configs gemv5:2x1x128 --out "$out/bench_kernels_kashin_g$g" > "$out/bench_kernels_kashin_g$g.log" 2>&1 || true
             done ;;
  sweep-gemv) python -m eval.sweep_gemv --splits 1,2 --evict ",evict_first" ;;  # issue 5: GEMV tiles, cold L2
  prep-dct)  python -m eval.sweep_prep_dct --prep-pdl 1 --precisions tf32x3 ;;  # issue 5: kashin's input preparation alone
  generate-eager-repeat) # issue 5: the eager column of bench_generate read 9.2 tokens/s for rtn-4 once (13-19 before)
             python -m eval.bench_generate --contenders bf16,rtn-4,rtn-2 --new-tokens 64 --out "$out/bench_generate_eager" ;;
  quantize)  # issue 5: the 7B-shaped streamed quantization, with (since the twenty-seventh session) its byte floor
             # (the same bytes moved with no arithmetic), the overlapped loop (stream.OVERLAP) and the arithmetic
             # alone against rtn, bitsandbytes NF4 and kashin with the code-assignment kernel (fit_kernels)
             timeout 480 python -m eval.bench_quantize --device cuda --workdir /tmp --out "$out/bench_quantize" \
               > "$out/bench_quantize.log" 2>&1 || true ;;
  recovery3) [ -d /tmp/rec/k3 ] || python -m quantune quantize /tmp/smollm2.gguf --bits 3 --out /tmp/rec/k3 --no-eval
             mkdir -p "$out/logs"
             for objective in ce kd; do for init in default residual; do  # the four runs side by side on one GPU
               python -m quantune finetune /tmp/rec/k3 --data /tmp/austen/emma.txt --data /tmp/austen/mansfieldpark.txt \
                 --data /tmp/austen/sensesensibility.txt --data /tmp/austen/northangerabbey.txt \
                 --data /tmp/austen/prideprejudice.txt --eval-data /tmp/austen/persuasion.txt --eval-windows 16 \
                 --eval-seq-len 2048 --seq-len 512 --batch-size 16 --steps 150 --lr 1e-3 --schedule wsd \
                 --warmup-steps 10 --objective $objective --init $init --teacher /tmp/smollm2.gguf --cache-weights \
                 --out /tmp/rec/k3-$objective-$init > "$out/logs/k3-$objective-$init.log" 2>&1 &
             done; done
             wait
             for d in /tmp/rec/k3-*; do mkdir -p "$out/finetune_recovery_3bit/$(basename $d)"
               cp $d/report.json $d/report.md $d/curves.png "$out/finetune_recovery_3bit/$(basename $d)/" 2>/dev/null || true; done
             python -m eval.recovery_table /tmp/rec 29.871 --out "$out/finetune_recovery_3bit" ;;
  finetune)  python -m eval.bench_finetune --out "$out/bench_finetune" ;;                        # issue 4
  memory)    python -m eval.bench_memory --out "$out/bench_memory" ;;                            # issue 6
  generate)  # rtn and kashin in two runs: five contenders with --compile did not fit one 10-minute call
             python -m eval.bench_generate --contenders bf16,rtn-4,rtn-2 --new-tokens 64 --compile \
               --out "$out/bench_generate" ;;                                                      # issue 5
  prep-sweep) # issue 5: the input preparation's warps and mode 6's float32 copy (rtn), the two DCT launches' warps
             # (kashin), the whole call, cold L2
             mkdir -p "$out/rtn_prep" "$out/kashin_prep"
             OUT="$out/rtn_prep" timeout 200 python -m eval.sweep_gemv --methods rtn-4,rtn-2 --splits 1 --evict evict_first \
               --shapes 4096x14336,14336x4096,8192x28672 --configs 4x1x64,1x1x128 --whole-configs default \
               --prep-warps 1,2,4 --prep-xd 1,0 > "$out/rtn_prep/log.txt" 2>&1 || true
             OUT="$out/kashin_prep" timeout 150 python -m eval.sweep_prep_dct --widths 4096 --warps 4x4,4x2,4x1,2x1 \
               --precisions tf32x3 --prep-pdl 1 --stage2-k2 16,32,64 > "$out/kashin_prep/log.txt" 2>&1 || true
             for w in 4x4-16 4x2-16 4x1-16 4x4-64 4x2-64; do
               OUT="$out/kashin_prep/$w" timeout 60 python - "$w" <<'PY' >> "$out/kashin_prep/log_whole.txt" 2>&1 || true
import runpy, sys
from quantune import kernels
warps, k2 = sys.argv[1].split("-")
kernels.DCT_WARPS, kernels.DCT_STAGE2_K2 = tuple(int(v) for v in warps.split("x")), int(k2)
sys.argv = ["sweep_gemv", "--methods", "kashin-4,kashin-2", "--shapes", "4096x4096,4096x14336", "--splits", "1",
            "--evict", "evict_first", "--configs", "8x2x128", "--whole-configs", "default"]
runpy.run_module("eval.sweep_gemv", run_name="__main__")
PY
             done ;;
  chunk-split) # issue 5: why the 256-word tile runs faster with 2048-column chunks than over two 1024-column ones
             # (ncu, same process), then 2048-column chunks with 1, 2 or 4 preparation programs each (PREP_SPLIT)
             mkdir -p "$out/ncu" "$out/long" "$out/many"
             timeout 150 ncu --clock-control none -k regex:_gemv_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis \
               --section WarpStateStats --section InstructionStats python -m eval.profile_gemv --calls 1 \
               --cases rtn-4:14336x4096:1x1x256:1024s,rtn-4:14336x4096:1x1x256:2048 > "$out/ncu/ncu_chunk_gap.txt" 2>&1 || true
             OUT="$out/long" timeout 200 python -m eval.sweep_gemv --methods rtn-4,rtn-2 --shapes 14336x4096 \
               --configs 1x1x256,1x1x128 --splits 1 --evict evict_first --whole-configs default,1x1x256,1x1x256u2,default \
               --prep-columns 1024,2048 --prep-split 1,2,4 > "$out/long/log.txt" 2>&1 || true
             OUT="$out/many" timeout 180 python -m eval.sweep_gemv --methods rtn-4,rtn-2 --shapes 4096x14336,8192x28672 \
               --configs 4x1x64 --splits 1 --evict evict_first --whole-configs default,default --prep-columns 1024,2048 \
               --prep-split 1,2 > "$out/many/log.txt" 2>&1 || true ;;
  round-probe) # issue 5: rtn's GEMV rounding its own input per tile (no preparation kernel) against the library's
             # whole call and bf16, same run, groups of 64 and one group a row
             mkdir -p "$out/g64" "$out/row"
             OUT="$out/g64" timeout 240 python -m eval.probe_round_gemv > "$out/g64/log.txt" 2>&1 || true
             OUT="$out/row" timeout 200 python -m eval.probe_round_gemv --group row --configs 4x1x64,2x1x128,8x1x64 \
               > "$out/row/log.txt" 2>&1 || true ;;
  fused-prep) # issue 5: rtn's GEMV preparing its own input in its first programs (one launch, a counter) against
             # the library's two launches, same run; groups of 64, then one group a row and the poll's sleep
             mkdir -p "$out/g64" "$out/row"
             OUT="$out/g64" timeout 240 python -m eval.probe_fused_prep > "$out/g64/log.txt" 2>&1 || true
             OUT="$out/row" timeout 150 python -m eval.probe_fused_prep --group row --pieces 512 --sleep 0,64,256 \
               --shapes 4096x14336,14336x4096 > "$out/row/log.txt" 2>&1 || true ;;
  long-rows) # issue 5 (run in the seventeenth session: slower, kernel_sweeps/sweep_gemv_long_two_rows_*.json):
             # rtn-4's long-row layer (14336x4096) with two rows a warp over 256 words (the input's pairs
             # loaded once for both rows: sm_90 loop 209 instructions for 128 weights a thread against 123 for 64),
             # against the library's one row a warp; groups of 64, then one scale a row
             mkdir -p "$out/g64" "$out/row"
             for g in 64 row; do
               OUT="$out/$([ $g = row ] && echo row || echo g64)" timeout 150 python -m eval.sweep_gemv --methods rtn-4 \
                 --shapes 14336x4096 --configs 2x1x256 --whole-configs default,2x1x256,2x1x256u2,1x1x256u2,2x1x128 \
                 --splits 1 --evict evict_first --group $g > /dev/null 2>&1 || true
             done ;;
  rtn-groups) # issue 5: rtn's decode per call at the library's default (one scale a row), groups of 128 and of 64,
             # the same machine; then bf16 and the library alternated five rounds, one scale a row
             for g in row 128 64; do
               timeout 200 python -m eval.bench_kernels --methods rtn-4,rtn-2 --rtn-group $g \
                 --configs gemv6:4x1x64,gemv6:2x1x128,gemv6:1x1x128,gemv6:8x1x64 --out "$out/bench_kernels_rtn_$g"
             done
             timeout 150 python -m eval.bench_ratio_spread --group row --rounds 5 --out "$out/bench_ratio_spread_row" ;;
  generate-noshare) python -m eval.bench_generate --contenders bf16,rtn-4 --new-tokens 64 --compile --no-share-pass \
               --out "$out/bench_generate_noshare" ;;   # issue 5: the same compile without quantune's ShareInputs pass
  generate-kashin) python -m eval.bench_generate --contenders bf16,kashin-4,kashin-2 --new-tokens 64 --compile \
               --out "$out/bench_generate_kashin" ;;                                               # issue 5
  chunks)    python -m eval.sweep_prep_columns ;;                                                  # issue 5
  joined)    python -m eval.bench_joined ;;   # issue 5: q/k/v and gate/up as one GEMV launch against a launch each
  decode-sweep) python -m eval.sweep_decode ;;  # issue 5: tiles of the bf16 decode for prefill
  joined-decode) # issue 5: the joined decode's pipelining depth (one stage: far fewer instructions at 2 bits when
             # compiled with Triton 3.6) at 4 and 2 bits, both ways to values, the library's tile; then the kernel bench
             # for kashin in groups of 128 at the library's defaults (set them from the sweep first)
             for b in 4 2; do
               mkdir -p "$out/joined_b$b"
               OUT="$out/joined_b$b" timeout 200 python -m eval.sweep_joined_decode --bits $b \
                 --cases 4096x4096:128,8192x28672:128,4096x4096:64,14336x4096:128 --block-m 64 --warps 4 \
                 --programs 1024 --decodes signs,bits --stages 3,1 > "$out/joined_b$b/sweep.log" 2>&1 || true
             done
             python -m eval.bench_kernels --methods kashin-4,kashin-2 --kashin-group 128 --configs gemv5:2x1x128 \
               --out "$out/bench_kernels_kashin_g128" ;;
  half-coeffs) # issue 5 (run in the twenty-fourth session, groups of 64 in the twenty-fifth: kernel_sweeps/half_coeffs/, session25/): kashin's kernels reading the stored float16 coefficients (quantune.kernels.HALF_COEFFS, on
             # since the twenty-third session from sm_90 code read here: loops equal or shorter) against the float32
             # planes, in one process: what a layer holds on the GPU after its calls, the few-token call per row and
             # at groups of 128 and 64, then the joined decode
             OUT="$out" timeout 60 python -m eval.bench_layer_memory > "$out/bench_layer_memory.log" 2>&1 || true
             for g in row 128 64; do
               OUT="$out/half_$g" timeout 140 python -m eval.ab_kernels --forms both --methods kashin-4,kashin-2 \
                 --kashin-group $g --repeat 2 > "$out/half_$g.log" 2>&1 || true  # rows also in the log
             done
             OUT="$out/half_joined" timeout 100 python -m eval.sweep_joined_decode --cases 4096x4096:128,8192x28672:128,4096x4096:64 \
               --block-m 64 --warps 4 --programs 1024 --decodes signs --forms library,planes --tokens 0 ;;
  tied-steps) # issue 5 (run in the twenty-fourth and twenty-fifth sessions, kernel_sweeps/tied_steps/, session25/): kashin-4's GEMV reading two tied U planes (QuantConfig.tied_steps 2, an option since the
             # twenty-fourth session) as one integer field against every plane alone, same layers, one process: per
             # row, then coefficients per 128 and 64 columns (sm_90 loops with Triton 3.6: 255 -> 207, 533 -> 458,
             # 550 -> 471 instructions); then the whole bench with tied layers (kashin's rows against the last run's)
             for g in row 128 64; do
               OUT="$out/tied_$g" timeout 150 python -m eval.ab_kernels --forms folds --methods kashin-4 \
                 --kashin-tied 2 --kashin-group $g --repeat 3 > "$out/tied_$g.log" 2>&1 || true
             done
             timeout 150 python -m eval.bench_kernels --methods kashin-4 --kashin-tied 2 --configs gemv5:2x1x128 \
               --out "$out/bench_kernels_kashin4_tied" ;;
  long-dct)  # issue 5 (run in the twenty-fourth session, kernel_sweeps/long_dct/; now on for N1 of 129-256): kashin's
             # two-launch input DCT for groups of up to 256 x 64 (stage two in steps of DCT_STAGE2_CHUNK rows), against
             # the rfft path: the preparation alone, then whole calls of the library (8192 = 128 x 64 on the rfft path)
             # beside versions that take every N1 up to 256, with and without the GEMV's two passes
             mkdir -p "$out/long_dct"
             OUT="$out/long_dct" timeout 240 python -m eval.sweep_prep_dct --widths 14336,8192,11008 --max-n1 256 \
               --stage2-chunk 32,64,128 --stage2-k2 16,32 --warps 4x4 --precisions tf32x3 --prep-pdl 1 \
               > "$out/long_dct/log.txt" 2>&1 || true
             # v0: every long group in two launches; v1: the same without the GEMV's two passes (LATE, which the
             # two launches switch on for up to 32 MB of codes: 14336x4096 at 4 bits)
             sed 's/^DCT_LONG_MIN_N1 = 129/DCT_LONG_MIN_N1 = 65/' quantune/kernels.py > /tmp/kernels_longdct.py
             sed 's/^GEMV_LATE = True/GEMV_LATE = False/' /tmp/kernels_longdct.py > /tmp/kernels_longdct_nolate.py
             OUT="$out/long_dct_ab" python -m eval.ab_kernels /tmp/kernels_longdct.py /tmp/kernels_longdct_nolate.py \
               --methods kashin-4,kashin-2 --shapes 14336x4096,8192x28672 --repeat 3 ;;
  kashin-group-sums) # issue 5 (run in the twenty-fifth session, kernel_sweeps/session25/: 1.03-1.73x faster, now on):
             # kashin's GEMV with groups shorter than a tile, plane dots summed per group before one coefficient
             # (quantune.kernels.GEMV_GROUP_SUMS) against a coefficient gathered per word, versions side by side
             sed 's/^GEMV_GROUP_SUMS = True/GEMV_GROUP_SUMS = False/' quantune/kernels.py > /tmp/kernels_gsum.py
             for g in 128 64; do
               OUT="$out/gsum_g$g" python -m eval.ab_kernels /tmp/kernels_gsum.py --methods kashin-4,kashin-2 \
                 --kashin-group $g --repeat 3
             done ;;
  half-row)  # issue 5 (run in the twenty-fifth session, kernel_sweeps/session25/): kashin per row, the stored float16 coefficients (HALF_COEFFS) against the float32 planes on more
             # shapes and three repeats (the twenty-fourth session's two: HALF 13% slower at 8192x28672 kashin-4, 6%
             # faster at 14336x4096), to set which per-row layers keep the planes
             OUT="$out/half_row3" timeout 240 python -m eval.ab_kernels --forms both --methods kashin-4,kashin-2 \
               --kashin-group row --repeat 3 \
               --shapes 4096x4096,4096x14336,14336x4096,8192x28672,4096x28672,11008x4096,4096x11008 \
               > "$out/half_row3.log" 2>&1 || true ;;
  kashin-tiles-4096) # issue 5 (run in the twenty-fifth session: no change): kashin-4 at 4096x4096 (level with NF4 in the last bench run), the GEMV's tile, unroll
             # and two passes (LATE) swept on the whole call
             OUT="$out/kashin_tiles_4096" timeout 200 python -m eval.sweep_gemv --methods kashin-4,kashin-2 \
               --shapes 4096x4096 --configs 2x1x128 --splits 1 --late 0,1 \
               --whole-configs default,1x1x128,1x1x64,2x1x64,4x1x64,2x1x128u2,1x1x128u2,default \
               > "$out/kashin_tiles_4096.log" 2>&1 || true ;;
  ddp)       # issue 4 on nvidia-h200-x2: the same global batch on 1 and on 2 GPUs, the seed noise, and 2 GPUs at
             # the one-GPU per-GPU batch (throughput scaling); then the comparison table and plot
             [ -d /tmp/rec/k2 ] || python -m quantune quantize /tmp/smollm2.gguf --bits 2 --out /tmp/rec/k2 --no-eval
             mkdir -p "$out/logs"
             ft() { python -m quantune finetune /tmp/rec/k2 --data /tmp/austen/emma.txt \
               --data /tmp/austen/prideprejudice.txt --eval-data /tmp/austen/persuasion.txt --eval-windows 8 \
               --seq-len 512 --steps 100 --lr 1e-3 --schedule wsd --warmup-steps 10 --cache-weights "$@"; }
             ft --gpus 1 --batch-size 16 --out /tmp/rec/ddp-g1 > "$out/logs/ddp-g1.log" 2>&1
             ft --gpus 1 --batch-size 16 --seed 1 --out /tmp/rec/ddp-g1-seed1 > "$out/logs/ddp-g1-seed1.log" 2>&1
             ft --gpus 2 --batch-size 8 --out /tmp/rec/ddp-g2 > "$out/logs/ddp-g2.log" 2>&1
             ft --gpus 2 --batch-size 16 --lr-scaling sqrt --base-batch-size 16 --out /tmp/rec/ddp-g2-b32 \
               > "$out/logs/ddp-g2-b32.log" 2>&1
             python -m eval.ddp_compare "1 GPU, batch 16=/tmp/rec/ddp-g1" "2 GPUs, 8 each=/tmp/rec/ddp-g2" \
               "2 GPUs, 16 each=/tmp/rec/ddp-g2-b32" --noise /tmp/rec/ddp-g1-seed1 --out "$out/finetune_ddp" ;;
  *) echo "unknown step $1 (transforms, hold, hold-generate, defaults, kashin-groups, kernels, rtn-groups, chunk-split, round-probe, fused-prep, long-rows, prep-sweep, sweep-gemv, prep-dct, generate-eager-repeat, quantize, recovery3, finetune, memory, generate, generate-noshare, generate-kashin, chunks, joined, decode-sweep, joined-decode, kashin-group-sums, long-dct, half-coeffs, half-row, kashin-tiles-4096, ddp)"; exit 2 ;;
esac
