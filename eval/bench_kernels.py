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

from quantune.report import markdown_table

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


def bench(fn, reps: int = 50) -> float:
    """Median seconds per call (triton's do_bench: warm-up, L2 flush between calls)."""
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES))
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--out", default="eval/results/bench_kernels")
    args = p.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from quantune.kernels import bitplane_matmul

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
        t_bf16_prefill = bench(lambda: xp @ w16.T)
        packed, state = bnbf.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
        t_nf4 = bench(lambda: bnb.matmul_4bit(x1, packed.t(), quant_state=state))
        nf4_err = float((bnb.matmul_4bit(x1, packed.t(), quant_state=state).float() -
                         x1.float() @ bnbf.dequantize_4bit(packed, state).float().T).abs().max())
        base = {"in": k, "out": n, "bf16_decode_s": t_bf16, "bf16_prefill_s": t_bf16_prefill,
                "nf4_decode_s": t_nf4, "nf4_max_abs_err": nf4_err, "bf16_floor_s": 2 * n * k / bw}
        for method, bits in (("kashin", 4), ("kashin", 2), ("rtn", 4), ("rtn", 2)):
            q = quantune_layer(w, method, bits)
            form = q.bitplane_form()
            ref = x1.float() @ q.dequantize().T
            got = bitplane_matmul(x1, q.codes, form, bits)
            rel = float((got - ref).norm() / ref.norm())
            t_q = bench(lambda: bitplane_matmul(x1, q.codes, form, bits))
            t_q_prefill = bench(lambda: xp @ q.dequantize().to(torch.bfloat16).T)
            index_bytes = q.codes.numel()
            meta_bytes = sum(t.numel() * t.element_size() for name, t in q.buffers_dict().items() if name != "codes")
            row = {**base, "method": f"{method}-{bits}", "rel_err_vs_reference": rel, "decode_s": t_q,
                   "prefill_s": t_q_prefill, "floor_s": (index_bytes + meta_bytes) / bw,
                   "speedup_vs_bf16": t_bf16 / t_q, "speedup_vs_nf4": t_nf4 / t_q,
                   "prefill_vs_bf16": t_bf16_prefill / t_q_prefill}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": device, "copy_bandwidth_Bps": bw, "rows": rows},
                                                   indent=2))
    us = 1e6
    table = markdown_table(
        ["in x out", "method", "rel. err", "decode us", "floor us", "bf16 us", "NF4 us", "x bf16", "x NF4",
         "prefill ms", "bf16 prefill ms", "prefill x bf16"],
        [[f"{r['in']}x{r['out']}", r["method"], r["rel_err_vs_reference"], r["decode_s"] * us, r["floor_s"] * us,
          r["bf16_decode_s"] * us, r["nf4_decode_s"] * us, r["speedup_vs_bf16"], r["speedup_vs_nf4"],
          r["prefill_s"] * 1e3, r["bf16_prefill_s"] * 1e3, r["prefill_vs_bf16"]] for r in rows])
    md = (f"# Low-bit matmul kernels\n\nDevice: {device}. Decode: 1 token; prefill: {args.prefill_tokens} tokens "
          f"(quantune: decode to bf16 + GEMM). Floor: index + codebook bytes / copy bandwidth.\n\n{table}\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
