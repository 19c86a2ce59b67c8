"""Low-bit matmul speed on one GPU: quantune's fused kernel vs bf16 cuBLAS vs bitsandbytes NF4.

    python -m eval.bench_kernels --out eval/results/bench_kernels

For every (in, out) shape: random weights (std 0.02), quantized by quantune (kashin and rtn,
4 and 2 bits) and by bitsandbytes NF4; x random bf16. Decode (1 token): the fused bit-plane
kernel (quantune.kernels), torch bf16 ``x @ W^T``, ``bnb.matmul_4bit``. Prefill (2048 tokens):
quantune decodes the weight to bf16 and runs one GEMM (timed together) against bf16 GEMM.
Correctness: every kernel output is compared with the float32 reference (``x @ W_hat^T`` from
the module's own dequantization) in the same run. The table states the measured device copy
bandwidth and each case's byte floor (bytes read / bandwidth).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


def bench(fn, reps: int = 50) -> float:
    """Median seconds per call with the calls captured in a CUDA graph (no launch overhead: what a
    decode loop under CUDA graphs or torch.compile sees); eager timing when capture fails."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=reps, return_mode="median") / 1e3
    except Exception:  # not capturable
        torch.cuda.synchronize()
        return do_bench(fn, rep=reps, return_mode="median") / 1e3


def bench_eager(fn, reps: int = 50) -> float:
    """Median seconds per call launched from Python (includes launch overhead)."""
    from triton.testing import do_bench

    return do_bench(fn, rep=reps, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = bench(lambda: b.copy_(a))
    return 2 * a.numel() / seconds  # read + write


def quantune_layer(w: torch.Tensor, method: str, bits: int):
    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = QuantConfig(method=method, bits=bits, group_size=64 if method == "rtn" else None)
    q, _ = QuantLinear.from_linear(lin, cfg)
    return q


# (kernel, rows per program, warps) tried per case: "planes" = bit-plane dot products,
# "levels" = per-row level tables (kashin) or the affine grid (rtn)
# "words" = level tables with the codes read as 32-bit words
CONFIGS = [("planes", 4, 1), ("levels", 2, 1), ("levels", 4, 1), ("levels", 4, 2),
           ("words", 2, 1), ("words", 4, 1), ("words", 4, 2), ("words", 8, 4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES))
    p.add_argument("--methods", default="kashin-4,kashin-2,rtn-4,rtn-2")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--configs", default=None, help="configs to try, e.g. planes:4x1,levels:8x2 (kernel:rows x warps)")
    p.add_argument("--block-k", type=int, default=None, help="K tile (default: the largest power of two <= 256 "
                                                              "dividing the group)")
    p.add_argument("--out", default="eval/results/bench_kernels")
    args = p.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from quantune.kernels import bitplane_matmul, level_tables, levels_matmul, transformed_input

    configs = ([(c.split(":")[0], *map(int, c.split(":")[1].split("x"))) for c in args.configs.split(",")]
               if args.configs else CONFIGS)
    bw = copy_bandwidth()
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") * 0.02
        w16 = w.to(torch.bfloat16)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        xp = torch.randn(args.prefill_tokens, k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: x1 @ w16.T)
        t_bf16_eager = bench_eager(lambda: x1 @ w16.T)
        t_bf16_prefill = bench(lambda: xp @ w16.T)
        packed, state = bnbf.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
        t_nf4 = bench(lambda: bnb.matmul_4bit(x1, packed.t(), quant_state=state))
        base = {"in": k, "out": n, "bf16_decode_s": t_bf16, "bf16_decode_eager_s": t_bf16_eager,
                "bf16_prefill_s": t_bf16_prefill, "nf4_decode_s": t_nf4, "bf16_floor_s": 2 * n * k / bw,
                "nf4_floor_s": (n * k / 2 + n * k / 64) / bw}
        for spec in args.methods.split(","):
            method, bits = spec.split("-")
            bits = int(bits)
            q = quantune_layer(w, method, bits)
            form = q.bitplane_form()
            ref = x1.float() @ q.dequantize().T
            x32 = x1.float().contiguous()
            xq = transformed_input(x32, form).float().contiguous()
            tables = level_tables(form, bits)

            def kernel_call(kind, bm, nw, xq_arg):
                if kind == "planes":
                    return lambda: bitplane_matmul(x1, q.codes, form, bits, block_m=bm, num_warps=nw, xq=xq_arg,
                                                   block_k=args.block_k)
                return lambda: levels_matmul(x1, q.codes, form, bits, tables=tables, block_m=bm, num_warps=nw,
                                             xq=xq_arg, block_k=args.block_k, words=kind == "words")

            timings = {}
            for kind, bm, nw in configs:  # the kernel alone, input transform precomputed
                try:
                    timings[(kind, bm, nw)] = bench(kernel_call(kind, bm, nw, xq))
                except Exception as exc:  # a config that does not compile here
                    print(f"config {kind} {bm}x{nw}: {type(exc).__name__}: {exc}"[:200], flush=True)
            (kind, bm, nw), t_kernel = min(timings.items(), key=lambda kv: kv[1])
            got = kernel_call(kind, bm, nw, None)()
            rel = float((got - ref).norm() / ref.norm())
            t_full = bench(kernel_call(kind, bm, nw, None))
            t_transform = bench(lambda: transformed_input(x32, form)) if form.transform else 0.0
            with torch.no_grad():
                t_module = t_module_eager = bench_eager(lambda: q(x1))  # the module as called from Python
                t_q_prefill = bench_eager(lambda: xp @ q.dequantize().to(torch.bfloat16).T)
                got_p = q(xp[:64]).float()
            ref_p = xp[:64].float() @ q.dequantize().T
            index_bytes = q.codes.numel()
            meta_bytes = sum(t.numel() * t.element_size() for name, t in q.buffers_dict().items() if name != "codes")
            row = {**base, "method": spec, "rel_err_vs_reference": rel,
                   "prefill_rel_err": float((got_p - ref_p).norm() / ref_p.norm()),
                   "best_config": {"kernel": kind, "block_m": bm, "num_warps": nw},
                   "config_seconds": {f"{c}:{a}x{b}": v for (c, a, b), v in timings.items()},
                   "kernel_s": t_kernel, "decode_s": t_full, "transform_s": t_transform, "module_s": t_module,
                   "module_eager_s": t_module_eager, "prefill_s": t_q_prefill,
                   "floor_s": (index_bytes + meta_bytes) / bw,
                   "speedup_vs_bf16": t_bf16 / t_full, "speedup_vs_nf4": t_nf4 / t_full,
                   "kernel_speedup_vs_bf16": t_bf16 / t_kernel, "prefill_vs_bf16": t_bf16_prefill / t_q_prefill}
            print(json.dumps(row), flush=True)
            rows.append(row)
            q = tables = None  # free the layer before the next case
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s"
    out = Path(args.out)
    us = 1e6
    table = markdown_table(
        ["in x out", "method", "kernel", "rel. err", "decode us", "kernel us", "transform us", "floor us", "bf16 us",
         "NF4 us", "x bf16", "x NF4", "prefill ms", "bf16 prefill ms", "prefill x bf16"],
        [[f"{r['in']}x{r['out']}", r["method"], r["best_config"]["kernel"], r["rel_err_vs_reference"], r["decode_s"] * us, r["kernel_s"] * us,
          r["transform_s"] * us, r["floor_s"] * us, r["bf16_decode_s"] * us, r["nf4_decode_s"] * us,
          r["speedup_vs_bf16"], r["speedup_vs_nf4"], r["prefill_s"] * 1e3, r["bf16_prefill_s"] * 1e3,
          r["prefill_vs_bf16"]] for r in rows])
    md = (f"# Low-bit matmul kernels\n\nDevice: {device}. Times are medians with the calls captured in a CUDA "
          f"graph (triton.testing.do_bench_cudagraph). Decode: 1 token, quantune = input transform + fused "
          f"kernel (best of {len(configs)} kernel/tile configs; kernel column: the kernel alone); prefill: "
          f"{args.prefill_tokens} tokens (eager timing), quantune decodes the weight to bf16 + one GEMM. Floor: index + "
          f"coefficient bytes / copy bandwidth. rel. err: kernel vs the float32 reference x W_hat^T.\n\n{table}\n")
    write_results(out, {"device": device, "copy_bandwidth_Bps": bw, "rows": rows}, md)


if __name__ == "__main__":
    main()
