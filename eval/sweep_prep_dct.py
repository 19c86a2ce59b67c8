"""Probe: kashin's input preparation for the few-token GEMV alone (no GEMV after it), one token, CUDA-graph
medians of back-to-back preparations (each waits for the one before it, so a chain's time is its latency):
the rfft path (prep kernel, cuFFT rfft, post, pairs) against the two-launch path (quantune.kernels.dft_split)
with each launch alone, for first factors up to 256 (--max-n1) with stage two in steps (--stage2-chunk), over warps per program and tl.dot precisions, with and without programmatic dependent
launch between the preparation's own kernels; rtn's one preparation kernel as the floor of one launch. The
error of each variant's transformed input against the rfft path's. Writes $OUT/sweep_prep_dct.json. Run on
the GPU: ``python -m eval.sweep_prep_dct``; on the CPU it runs one small case under TRITON_INTERPRET=1 and
times nothing."""
import argparse
import json

import torch

from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="4096,1536", help="input widths (DCT groups of one row) the two-launch "
                                                           "path serves (quantune.kernels.dft_split)")
    p.add_argument("--warps", default="4x4,2x4")
    p.add_argument("--precisions", default="tf32x3,tf32")
    p.add_argument("--prep-pdl", default="0,1")
    p.add_argument("--stage2-k2", default="16", help="stage two's k2 outputs per program to try "
                                                     "(quantune.kernels.DCT_STAGE2_K2: 16, 32, 64)")
    p.add_argument("--max-n1", type=int, default=None, help="quantune.kernels.DCT_MAX_N1 for this run (up to 256: "
                                                           "14336 = 224 x 64, 8192 = 128 x 64, 11008 = 172 x 64)")
    p.add_argument("--stage2-chunk", default=None, help="stage two's rows of A a step to try where 2 N1P > 128 "
                                                        "(quantune.kernels.DCT_STAGE2_CHUNK: 32, 64, 128)")
    args = p.parse_args()
    from eval import bench_kernels
    from quantune import kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kernels.DEV = dev
    bench = bench_kernels.bench if dev == "cuda" else (lambda f: 0.0)
    widths = [int(w) for w in args.widths.split(",")] if dev == "cuda" else [256]
    warps = [tuple(map(int, w.split("x"))) for w in args.warps.split(",")] if dev == "cuda" else [(4, 4)]
    precisions = args.precisions.split(",") if dev == "cuda" else ["tf32x3"]
    rows = []
    k2s = [int(v) for v in args.stage2_k2.split(",")] if dev == "cuda" else [16, 64]
    saved = (kernels.DCT_TWO_STAGE, kernels.DCT_WARPS, kernels.DCT_DOT_PRECISION, kernels.PREP_PDL,
             kernels.DCT_STAGE2_K2, kernels.DCT_MAX_N1, kernels.DCT_STAGE2_CHUNK, kernels.DCT_LONG_MIN_N1)
    if args.max_n1 is not None:  # every first factor up to it (the library skips 65 to DCT_LONG_MIN_N1 - 1)
        kernels.DCT_MAX_N1, kernels.DCT_LONG_MIN_N1 = args.max_n1, 65
    if dev != "cuda" and args.stage2_chunk:
        widths = [72 * 64]  # N1 = 72: padded to 128, stage two in steps
    chunks = [int(v) for v in args.stage2_chunk.split(",")] if args.stage2_chunk else [kernels.DCT_STAGE2_CHUNK]

    def record(**row):
        print(json.dumps(row), flush=True)
        rows.append(row)

    try:
        for k in widths:
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, 256, bias=False, device=dev)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            for method in ("kashin", "rtn"):
                q, _ = QuantLinear.from_linear(lin, QuantConfig(method=method, bits=4,
                                                                group_size=64 if method == "rtn" else None))
                form = q.bitplane_form()
                pairs = kernels.gemv_pairs(kernels.gemv_default_mode(method == "rtn", 4))
                pdls = [bool(int(v)) for v in args.prep_pdl.split(",")] if dev == "cuda" else [False]  # no PTX on the CPU
                for pdl in pdls:
                    kernels.PREP_PDL = pdl
                    trig = dev == "cuda"
                    prep = lambda: kernels.prepared_input(x, form, 4, pairs=pairs, trigger=trig, share=False)  # noqa: E731
                    if method == "rtn":
                        record(k=k, path="rtn prep (one launch)", prep_pdl=pdl, us=bench(prep) * 1e6)
                        continue
                    kernels.DCT_TWO_STAGE = False
                    ref = prep()
                    record(k=k, path="rfft", prep_pdl=pdl, us=bench(prep) * 1e6)
                    kernels.DCT_TWO_STAGE = True
                    if kernels.dft_split(k) is None:
                        print(f"k = {k}: no two-launch split at DCT_MAX_N1 = {kernels.DCT_MAX_N1}", flush=True)
                        continue
                    n1p = max(16, kernels._pow2(kernels.dft_split(k)[0]))
                    steps = chunks if 2 * n1p > 128 else [None]  # one step up to N1P = 64 (stage2_chunk)
                    for w, prec, k2, rch in ((w, p_, k2, r) for w in warps for p_ in precisions for k2 in k2s
                                             for r in steps):
                        kernels.DCT_WARPS, kernels.DCT_DOT_PRECISION, kernels.DCT_STAGE2_K2 = w, prec, k2
                        if rch is not None:
                            kernels.DCT_STAGE2_CHUNK = rch
                        got = prep()
                        err = float((got[1] - ref[1]).norm() / ref[1].norm())
                        times = {}
                        for name, launches in (("both", (True, True)), ("stage1", (True, False)),
                                               ("stage2", (False, True))):
                            times[name] = bench(lambda launches=launches: kernels._two_stage_input(
                                x, form, 4, trig, pdl, launches)) * 1e6
                        record(k=k, path="two-stage", prep_pdl=pdl, warps=list(w), precision=prec, stage2_k2=k2,
                               n1=kernels.dft_split(k)[0], stage2_chunk=kernels.stage2_chunk(n1p), us=times["both"], stage1_us=times["stage1"], stage2_us=times["stage2"],
                               xq_rel_diff_vs_rfft=err)
    finally:
        (kernels.DCT_TWO_STAGE, kernels.DCT_WARPS, kernels.DCT_DOT_PRECISION, kernels.PREP_PDL,
         kernels.DCT_STAGE2_K2, kernels.DCT_MAX_N1, kernels.DCT_STAGE2_CHUNK, kernels.DCT_LONG_MIN_N1) = saved
    bench_kernels.save_sweep(rows, "sweep_prep_dct", ("k", "path", "prep_pdl"), "us")


if __name__ == "__main__":
    main()
