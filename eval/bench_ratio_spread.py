"""How far the per-call speed-ups of eval/bench_kernels.py move between repeated measurements in one process.

bench_kernels times bf16 cuBLAS and quantune's library call once per case, so a ratio close to a target (2.93x
against 3x) may sit inside the run-to-run spread. Here, per case, bf16 ``x @ W^T`` and the library's whole
few-token call (quantune.kernels.fused_matmul, input preparation included) are timed in alternation ``--rounds``
times, both cold (the calls cycle through copies of the weights, eval.bench_kernels.cold_copies) under CUDA graphs;
the output is checked against the float32 reference once. Reports each round's ratio, their median, minimum and
maximum. Writes $OUT/bench_ratio_spread.{json,md} (or --out).

    python -m eval.bench_ratio_spread --methods rtn-4,rtn-2 --rounds 5

On the CPU (no GPU) it checks itself under TRITON_INTERPRET=1 on the shapes given (use small ones); its times
there mean nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--group", default="64", help="rtn's group size, or 'row'")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "eval/results"), "bench_ratio_spread"))
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from eval import bench_kernels  # after TRITON_INTERPRET: quantune's kernels read it on import
    from quantune.report import markdown_table, write_results

    bench_kernels.DEV = "cuda" if gpu else "cpu"
    dev = bench_kernels.DEV
    group = bench_kernels.parse_group(args.group, "--group")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    rows = []
    for k, n in shapes:
        torch.manual_seed(1)
        w16s = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                for _ in range(bench_kernels.cold_copies(2 * n * k))]
        for case in bench_kernels.rtn_cases([(k, n)], args.methods, group, time_bf16=False):
            x, call = case.x, bench_kernels.library_call(case.x, case.bits)
            want = x.float() @ case.q.dequantize().T
            got = call(case.copies[0]).float()
            err = float((got - want).norm() / want.norm())
            if err > 1e-2:  # the bf16 output rounds at ~2e-3
                raise SystemExit(f"{case.spec} {k}x{n}: relative error {err:.2e} against the reference")
            bf16 = bench_kernels.rotating([lambda w=w: x @ w.T for w in w16s])
            lib = bench_kernels.rotating([lambda c=c: call(c) for c in case.copies])
            t_bf16, t_lib = [], []
            for _ in range(args.rounds):
                t_bf16.append(bench_kernels.bench(bf16) * 1e6)
                t_lib.append(bench_kernels.bench(lib) * 1e6)
            ratios = [b / q for b, q in zip(t_bf16, t_lib)]
            rows.append({"in": k, "out": n, "method": case.spec, "group": case.group_label, "rel_err": err, "bf16_us": t_bf16, "library_us": t_lib, "x_bf16": ratios,
                         "x_bf16_median": statistics.median(ratios), "x_bf16_min": min(ratios),
                         "x_bf16_max": max(ratios)})
            print(rows[-1], flush=True)
        w16s = None
    device = torch.cuda.get_device_name() if gpu else "CPU (interpreter check; times mean nothing)"
    table = markdown_table(
        ["in x out", "method", "bf16 us (min-max)", "library us (min-max)", "x bf16 median", "x bf16 min-max",
         "rel. err"],
        [[f"{r['in']}x{r['out']}", r["method"], f"{min(r['bf16_us']):.2f}-{max(r['bf16_us']):.2f}",
          f"{min(r['library_us']):.2f}-{max(r['library_us']):.2f}", f"{r['x_bf16_median']:.3f}",
          f"{r['x_bf16_min']:.3f}-{r['x_bf16_max']:.3f}", f"{r['rel_err']:.1e}"] for r in rows])
    md = (f"# Per-call speed-up, repeated\n\nDevice: {device}, torch {torch.__version__}. Per case, bf16 cuBLAS "
          f"(`x @ W^T`) and quantune's whole few-token call (library dispatch, preparation included) timed in "
          f"alternation {args.rounds} times in one process, both cold (cycling through copies of the weights), "
          f"CUDA-graph medians; rtn groups: {args.group}. 'x bf16': per round, bf16 us / library us.\n\n{table}\n")
    write_results(Path(args.out), {"device": device, "rounds": args.rounds, "rows": rows}, md)


if __name__ == "__main__":
    main()
