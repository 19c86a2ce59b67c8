"""Sweep: the bf16 decode of rtn codes for prefill (quantune.kernels.decode_bf16, mode 1) over rows per
program, words per program and warps, on the four benchmark shapes at 2 and 4 bits (group 64, as in
bench_kernels); per config the decode alone and the whole prefill (decode, then one cuBLAS GEMM of
``--tokens`` tokens), CUDA-graph medians, against bf16 cuBLAS in the same run; outputs checked equal
to the default config's. Writes $OUT/sweep_decode.json. Run on the GPU: ``python eval/sweep_decode.py``;
without one it checks itself under TRITON_INTERPRET=1 on a small shape and times nothing."""
import argparse
import json

import torch

from eval.bench_kernels import save_sweep
from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    import triton.testing

    from quantune.kernels import decode_bf16

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)] if dev == "cuda" else [(256, 64)]
    tokens = args.tokens if dev == "cuda" else 8
    bench = (lambda f: triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3) if dev == "cuda" \
        else (lambda f: (f(), 0.0)[1])
    configs = [(bm, bw, nw) for bm in (2, 4, 8) for bw in (32, 64) for nw in (4,)]
    out = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        t_bf16 = bench(lambda: x @ lin.weight.T)
        for bits in (4, 2):
            q, _ = QuantLinear.from_linear(lin, QuantConfig(method="rtn", bits=bits, group_size=64))
            form, tables = q.bitplane_form(), q.level_tables()
            want = decode_bf16(q.codes, form, bits, k, tables=tables)[0]
            for bm, bw, nw in configs:
                def dec():
                    return decode_bf16(q.codes, form, bits, k, block_m=bm, block_w=bw, num_warps=nw, tables=tables)[0]
                same = bool(torch.equal(dec(), want))
                t_dec = bench(dec)
                t_pre = bench(lambda: x @ dec().T)
                row = dict(k=k, n=n, bits=bits, block_m=bm, block_w=bw, warps=nw, decode_us=t_dec, prefill_us=t_pre,
                           bf16_prefill_us=t_bf16, prefill_x_bf16=t_bf16 / t_pre if t_pre else None, equal=same)
                print(json.dumps(row), flush=True)
                out.append(row)
    save_sweep(out, "sweep_decode", ("k", "n", "bits"), "prefill_us")


if __name__ == "__main__":
    main()
