"""Probe: why bench_kernels' whole call of the best listed tile and the library's whole call part on rtn-4 4096x14336
(bench_kernels.json, that case: 9.85 us for gemv_matmul on the 2 x 1 x 128 tile with float32 output against 10.68
for fused_matmul on 4 x 1 x 64 with bf16 output, one run; a sweep of the two tiles through fused_matmul, bf16 output,
read 10.59 against 10.66 on another machine). The same layer's whole call (input preparation included, cold L2,
CUDA graph), each path timed ``--repeat`` times in alternation in one process, outputs compared:

- ``library``: quantune.kernels.fused_matmul, bf16 output (what the module runs);
- ``library-f32``: the same with float32 output;
- ``TILE-DTYPE``: gemv_matmul on that tile, rolled, with that output dtype (bench_kernels' path).

Outcome (H200, eval/results/kernel_sweeps/probe_whole_paths_{g64,row}.json, three alternations each): no path
effect. 4096x14336 groups of 64: 2 x 1 x 128 10.50-10.53 us (float32 out) / 10.55-10.56 (bf16), the library's
4 x 1 x 64 10.67-10.72 either way; one scale a row: all six 10.05-10.18. The 9.85 us was that run's one
measurement, not reproduced (bench_kernels times each path once: read its 'decode us' against 'library us' with
a few percent of spread).

Writes $OUT/probe_whole_paths.json: ``python -m eval.probe_whole_paths [--shapes 4096x14336] [--group 64]``. On the
CPU (no GPU) it runs the paths under TRITON_INTERPRET=1 on the shapes given (use small ones) and checks that each
computes the layer's product; its times there mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4")
    p.add_argument("--shapes", default="4096x14336")
    p.add_argument("--group", default="64", help="rtn's group size, or 'row'")
    p.add_argument("--tiles", default="2x1x128,4x1x64")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from eval import bench_kernels
    from quantune import kernels

    bench_kernels.DEV = "cuda" if gpu else "cpu"
    group = bench_kernels.parse_group(args.group, "--group")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    out = []
    for case in bench_kernels.rtn_cases(shapes, args.methods, group):
        x, bits = case.x, case.bits

        def tiled(bm, nw, bw, dtype):
            def call(layer):
                kernels._PREPARED.clear()
                split = kernels.gemv_split(layer[0].shape[0], layer[1], bits, bm, bw)
                return kernels.gemv_matmul(x, layer[0], layer[1], bits, block_m=bm, block_w=bw, num_warps=nw,
                                           split=split, affine=layer[2][2], mode=6, tables=layer[2],
                                           out_dtype=dtype)
            return call

        paths = {"library": bench_kernels.library_call(x, bits, out_dtype=torch.bfloat16),
                 "library-f32": bench_kernels.library_call(x, bits, out_dtype=torch.float32)}
        for tile in args.tiles.split(","):
            bm, nw, bw = map(int, tile.split("x"))
            for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
                paths[f"{tile}-{name}"] = tiled(bm, nw, bw, dtype)
        want = x.float() @ case.q.dequantize().T
        row = {"k": case.k, "n": case.n, "method": case.spec, "group": case.group_label,
               "bf16_us": case.bf16_s * 1e6 if case.bf16_s else None,
               "tile_library": list(kernels.gemv_tile(case.n, True, case.k, bits, case.form.group)),
               "rel_err": {}, "us": {name: [] for name in paths}}
        for name, path in paths.items():
            got = path(case.copies[0]).float()
            row["rel_err"][name] = float((got - want).norm() / want.norm())
            if row["rel_err"][name] > 1e-2:  # bf16 output rounds at ~2e-3; anything more is a wrong result
                raise SystemExit(f"{name}: relative error {row['rel_err'][name]:.2e} against the layer's product")
        for _ in range(args.repeat):
            for name, path in paths.items():
                row["us"][name].append(bench_kernels.bench(bench_kernels.rotating(
                    [lambda c=c, path=path: path(c) for c in case.copies])) * 1e6)
        print(json.dumps(row), flush=True)
        out.append(row)
    folder = os.environ.get("OUT", "/tmp/out")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "probe_whole_paths.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
