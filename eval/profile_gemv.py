"""Driver for Nsight Compute: runs the few-token GEMV (quantune.kernels.gemv_matmul, one token, input prepared
beforehand) and bf16 cuBLAS on the given shapes and formats, a few calls each, so that ``ncu`` can profile the
kernels (each call reads a fresh copy of the weights; ncu itself flushes the caches between its replays).
Configs as in eval/sweep_gemv.py (rows x warps x words). Example, on the GPU:

    ncu --clock-control none -k regex:'_gemv_kernel|gemv|gemm' --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis python -m eval.profile_gemv \
        --cases rtn-4:14336x4096:1x1x128,rtn-4:4096x14336:4x1x64

Without a GPU it runs each case once under TRITON_INTERPRET=1 on a small shape and checks it against torch."""
import argparse

import torch

from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="rtn-4:14336x4096:1x1x128,rtn-4:4096x14336:4x1x64",
                   help="method-bits:KxN:config[:COLUMNS[s]], comma-separated; COLUMNS: quantune.kernels.PREP_COLUMNS "
                        "for the case (mode 6's chunk of the input's rounding), 's': tiles over two chunks (span)")
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also run bf16 cuBLAS on each shape")
    args = p.parse_args()
    from quantune import kernels

    from eval.bench_kernels import probe_device

    dev = probe_device()
    gpu = dev == "cuda"
    for case in args.cases.split(","):
        spec, shape, config, *extra = case.split(":")
        saved_cols = kernels.PREP_COLUMNS, kernels.ROUNDING_COLUMNS_LONG
        if extra:  # the chunk width on every layer
            kernels.PREP_COLUMNS, kernels.ROUNDING_COLUMNS_LONG = int(extra[0].rstrip("s")), {}
        span = bool(extra) and extra[0].endswith("s")
        method, bits = spec.split("-")
        bits = int(bits)
        k, n = map(int, shape.split("x")) if gpu else (256, 64)
        bm, nw, bw = map(int, config.split("x"))
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        q, _ = QuantLinear.from_linear(lin, QuantConfig(method=method, bits=bits,
                                                        group_size=64 if method == "rtn" else None))
        form, tables = q.bitplane_form(), q.level_tables()
        mode = kernels.gemv_default_mode(tables[2], bits)
        prepared = kernels.prepared_input(x, form, bits, pairs=kernels.gemv_pairs(mode), share=False)
        copies = [q.codes.clone() for _ in range(args.calls)]
        for codes in copies:
            y = kernels.gemv_matmul(x, codes, form, bits, block_m=bm, block_w=bw, num_warps=nw, tables=tables,
                                    prepared=prepared, span=span)
        kernels.PREP_COLUMNS, kernels.ROUNDING_COLUMNS_LONG = saved_cols
        if args.bf16 and gpu:
            ws = [lin.weight.detach().clone() for _ in range(args.calls)]
            for w in ws:
                x @ w.T
        if gpu:
            torch.cuda.synchronize()
        want = x.float() @ q.dequantize().float().T
        err = ((y.float() - want).norm() / want.norm()).item()
        print(f"{case}: rel. err against the dequantized weight {err:.2e}")
        if not gpu:
            assert err < 1e-3, err


if __name__ == "__main__":
    main()
