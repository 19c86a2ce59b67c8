"""Tiles of kashin's joined decode (quantune.kernels.decode_joined_bf16: the whole weight U + V Q^T in bf16 for
prefill) on the GPU: rows a tile, warps, programs and the way codes become values (quantune.kernels.JOINED_DECODES),
per shape and group, CUDA-graph medians, next to a plain bf16 fill of the same matrix (the write alone) and the bf16
GEMM at --tokens tokens (prefill_vs_bf16_est: that GEMM's time over it plus the decode's, an estimate; eval/
bench_kernels.py measures the whole prefill); each result's error against the module's weight. Writes
$OUT/sweep_joined_decode.json and prints the best tile and the library default per case. Without a GPU (run
under TRITON_INTERPRET=1) it checks one small case and times nothing useful.

    python -m eval.sweep_joined_decode --cases 4096x4096:128,8192x28672:128,4096x4096:64
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="4096x4096:128,8192x28672:128,4096x4096:64", help="INxOUT:GROUP, kashin-4")
    p.add_argument("--block-m", default="16,32,64")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--programs", default="256,512,2048")
    p.add_argument("--decodes", default="signs", help="quantune.kernels.JOINED_DECODES, comma-separated")
    p.add_argument("--stages", default="3", help="the row loop's software-pipelining stages, comma-separated")
    p.add_argument("--bits", type=int, default=4, help="kashin's bits")
    p.add_argument("--once", action="store_true", help="call each tile once, untimed (for a profiler)")
    p.add_argument("--tokens", type=int, default=2048, help="the bf16 GEMM timed beside each case (0: none)")
    p.add_argument("--forms", default="library", help="library (QuantLinear's kernel form: the stored float16 "
                   "coefficients where quantune.kernels.HALF_COEFFS) and/or planes (the float32 planes)")
    args = p.parse_args()
    from eval import bench_kernels
    from quantune import kernels
    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kernels.DEV = dev
    if dev == "cpu":
        args.cases, args.block_m, args.warps, args.programs = "256x40:64", "16", "4", "4"
        args.decodes, args.stages, args.forms = ",".join(kernels.JOINED_DECODES), "3,1", "library,planes"
    default = (kernels.JOINED_BLOCK_M, 4, kernels.JOINED_PROGRAMS, kernels.JOINED_DECODE, kernels.JOINED_STAGES,
               "library")
    rows = []
    for case in args.cases.split(","):
        shape, g = case.split(":")
        k, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=dev)
        q, _ = QuantLinear.from_linear(lin, QuantConfig(bits=args.bits, group_size=int(g)))
        forms, ref = {"library": q.kernel_form(), "planes": q.bitplane_form()}, q.dequantize()
        fill = gemm = None
        if not args.once:
            fill = bench_kernels.bench(lambda: torch.empty(n, k, device=dev, dtype=torch.bfloat16).fill_(1)) * 1e6
            if args.tokens and dev == "cuda":
                x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
                wb = ref.to(torch.bfloat16)
                gemm = bench_kernels.bench(lambda: x @ wb.T) * 1e6
        tiles = [(bm, warps, progs, dec, st, fm) for bm in map(int, args.block_m.split(","))
                 for warps in map(int, args.warps.split(",")) for progs in map(int, args.programs.split(","))
                 for dec in args.decodes.split(",") for st in map(int, args.stages.split(","))
                 for fm in args.forms.split(",")]
        for bm, warps, progs, dec, st, fm in tiles:
            kernels.JOINED_PROGRAMS = progs

            def call():
                return kernels.decode_joined_bf16(q.codes, forms[fm], args.bits, k, block_m=bm, num_warps=warps,
                                                  decode=dec, stages=st)
            if args.once:
                call()
                if dev == "cuda":
                    torch.cuda.synchronize()
                continue
            try:
                t = bench_kernels.bench(call) * 1e6
            except Exception as exc:  # a tile the compiler rejects: recorded, the sweep goes on
                print(json.dumps(dict(k=k, n=n, group=int(g), block_m=bm, warps=warps, programs=progs, decode=dec,
                                      stages=st, form=fm, error=str(exc).splitlines()[0][:200])), flush=True)
                continue
            err = float((call().float() - ref).norm() / ref.norm())
            row = dict(k=k, n=n, group=int(g), bits=args.bits, block_m=bm, warps=warps, programs=progs, decode=dec,
                       stages=st, form=fm, us=t,
                       fill_bf16_us=fill, gemm_bf16_us=gemm, rel_err=err,
                       prefill_vs_bf16_est=gemm / (gemm + t) if gemm else None,
                       default=(bm, warps, progs, dec, st, fm) == default)
            print(json.dumps(row), flush=True)
            rows.append(row)
        kernels.JOINED_PROGRAMS = default[2]
    if args.once:
        return
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_joined_decode.json").write_text(json.dumps(rows, indent=1))
    for key in sorted({(r["k"], r["n"], r["group"]) for r in rows}):
        case = [r for r in rows if (r["k"], r["n"], r["group"]) == key]
        print("best", json.dumps(min(case, key=lambda r: r["us"])))
        print("default", json.dumps([r for r in case if r["default"]]))


if __name__ == "__main__":
    main()
