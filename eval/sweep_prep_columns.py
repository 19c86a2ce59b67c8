"""Sweep: rtn-2/rtn-4 GEMV (mode 6, one-warp 128-word tiles) with the input rounded per 1024 or 2048
columns (2-bit tiles can then hold 128 words) and 2/4/8 rows per program; whole call (input
preparation included), CUDA graph, against bf16 cuBLAS in the same run; bf16 output. Writes
$OUT/prep2048.json (committed as eval/results/kernel_sweeps/sweep_prep_columns.json).
Run on the GPU: ``python eval/sweep_prep_columns.py``; without one it checks itself under
TRITON_INTERPRET=1 on a small shape and times nothing."""
import json, os, sys, torch, triton
from quantune import kernels
from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear
dev = "cuda" if torch.cuda.is_available() else "cpu"
shapes = [(4096, 14336), (8192, 28672), (14336, 4096)] if dev == "cuda" else [(256, 64)]
bench = (lambda f: triton.testing.do_bench_cudagraph(f, rep=100) * 1e3) if dev == "cuda" else (lambda f: (f(), 0.0)[1])
out = []
for k, n in shapes:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    t_bf16 = bench(lambda: x @ lin.weight.T)
    for bits in (2, 4):
        q, _ = QuantLinear.from_linear(lin, QuantConfig(method="rtn", bits=bits, group_size=64))
        q = q.to(dev); form, tables = q.bitplane_form(), q.level_tables()
        ref = x.float() @ q.dequantize().T
        for cols in (1024, 2048):
            kernels.PREP_COLUMNS = cols
            for bm in (2, 4, 8):
                split = kernels.gemv_split(n, form, bits, bm, 128)
                def call():
                    kernels._PREPARED.clear()
                    return kernels.gemv_matmul(x, q.codes, form, bits, block_m=bm, block_w=128, num_warps=1, split=split, tables=tables, out_dtype=torch.bfloat16)
                err = float((call().float() - ref).norm() / ref.norm())
                t = bench(call)
                row = dict(k=k, n=n, bits=bits, cols=cols, block_m=bm, us=t, bf16_us=t_bf16, x_bf16=t_bf16 / t if t else None, rel_err=err)
                print(json.dumps(row), flush=True); out.append(row)
        kernels.PREP_COLUMNS = 1024
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "prep2048.json"), "w"), indent=1)
