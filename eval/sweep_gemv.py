"""Sweep: the few-token GEMV (quantune.kernels.gemv_matmul) over rows per program, warps, words per tile
and the K split, on the four benchmark shapes for the given formats (rtn: group 64, as in bench_kernels),
one token. Per config the kernel alone on an input prepared beforehand, CUDA-graph medians, the bytes it
reads (codes plus the coefficient tables it loads) per second, and whether its output equals the default
config's bitwise (a split of 2 adds two float32 parts: equal to split 1 up to rounding, checked to 1e-6);
then the whole call of the module's default choice (input preparation included) against bf16 cuBLAS in the
same run. Writes $OUT/sweep_gemv.json. Run on the GPU: ``python eval/sweep_gemv.py``; without one it checks
itself under TRITON_INTERPRET=1 on a small shape and times nothing."""
import argparse
import json
import os

import torch

from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear

CONFIGS = [(1, 1, 128), (1, 1, 256), (2, 1, 128), (2, 1, 256), (4, 1, 128), (4, 1, 64), (8, 1, 64), (2, 2, 128),
           (4, 2, 128), (8, 2, 128), (4, 4, 128), (8, 4, 128), (8, 8, 128), (16, 4, 128)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    args = p.parse_args()
    import triton.testing

    from quantune import kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if dev == "cuda" else [(256, 64)]
    configs = CONFIGS if dev == "cuda" else [(2, 1, 4), (1, 1, 8)]
    bench = (lambda f: triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3) if dev == "cuda" \
        else (lambda f: (f(), 0.0)[1])
    out = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        t_bf16 = bench(lambda: x @ lin.weight.T)
        for spec in args.methods.split(","):
            method, bits = spec.split("-")
            bits = int(bits)
            cfg = QuantConfig(method=method, bits=bits, group_size=64 if method == "rtn" else None)
            q, _ = QuantLinear.from_linear(lin, cfg)
            form, tables = q.bitplane_form(), q.level_tables()
            affine = tables[2]
            mode = kernels.gemv_default_mode(affine, bits)
            prepared = kernels.prepared_input(x, form, bits, pairs=kernels.gemv_pairs(mode), share=False)
            table_bytes = sum(t.numel() * t.element_size() for t in (tables[:2] if affine else (form.a, form.bx)) if
                              t is not None)
            read = q.codes.numel() + table_bytes
            bm0, nw0, bw0, _ = kernels.gemv_tile(n, affine)
            split0 = kernels.gemv_split(n, form, bits, bm0, bw0)
            want = kernels.gemv_matmul(x, q.codes, form, bits, block_m=bm0, block_w=bw0, num_warps=nw0, split=split0,
                                       tables=tables, prepared=prepared)
            for bm, nw, bw in configs:
                for split in (1, 2):
                    if kernels.gemv_block_w(form, bits, bw, split) is None:
                        continue

                    def call():
                        return kernels.gemv_matmul(x, q.codes, form, bits, block_m=bm, block_w=bw, num_warps=nw,
                                                   split=split, tables=tables, prepared=prepared)
                    try:
                        got = call()
                        t = bench(call)
                    except Exception as exc:  # a config that does not compile here
                        print(f"{spec} {k}x{n} {bm}x{nw}x{bw} split {split}: {type(exc).__name__}: {exc}"[:200])
                        continue
                    err = float((got - want).norm() / want.norm())
                    row = dict(k=k, n=n, method=spec, block_m=bm, warps=nw, block_w=bw, split=split,
                               kernel_us=t * 1e6 if t else None, read_GBps=read / t / 1e9 if t else None,
                               bf16_us=t_bf16 * 1e6, kernel_x_bf16=t_bf16 / t if t else None,
                               equal=bool(torch.equal(got, want)), rel_diff=err,
                               default=(bm, nw, bw, split) == (bm0, nw0, bw0, split0))
                    print(json.dumps(row), flush=True)
                    out.append(row)

            def whole():  # the module's own call, the input's preparation included (no reuse across calls)
                kernels._PREPARED.clear()
                return q(x)
            with torch.no_grad():
                t_whole = bench(whole)
            row = dict(k=k, n=n, method=spec, whole_call_us=t_whole * 1e6 if t_whole else None,
                       default_tile=[bm0, nw0, bw0, split0], bf16_us=t_bf16 * 1e6,
                       whole_x_bf16=t_bf16 / t_whole if t_whole else None, bytes_read=read)
            print("whole", json.dumps(row), flush=True)
            out.append(row)
    folder = os.environ.get("OUT", "/tmp/out")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sweep_gemv.json"), "w") as f:
        json.dump(out, f, indent=1)
    best = {}
    for r in out:
        if "kernel_us" not in r or r["kernel_us"] is None:
            continue
        key = (r["k"], r["n"], r["method"])
        if key not in best or r["kernel_us"] < best[key]["kernel_us"]:
            best[key] = r
    for r in best.values():
        print("best", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
