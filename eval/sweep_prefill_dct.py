"""Sweep: prefill's DCT (quantune.kernels.prefill_transformed_input: a pre pass, one batched cuFFT rfft, a post
pass) pass by pass, over the passes' tiles (columns x warps per program; the pre pass storing out of order or
gathering its inputs), against the torch DCT (quantune.transforms, float32) in the same run, on the benchmark
widths at ``--tokens`` tokens; outputs checked against the torch DCT. CUDA-graph medians. Writes
$OUT/sweep_prefill_dct.json. Run on the GPU: ``python -m eval.sweep_prefill_dct``; without one it checks itself
under TRITON_INTERPRET=1 on a small width and times nothing."""
import argparse
import json

import torch

from eval.bench_kernels import save_sweep
from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--widths", default="4096,8192,14336")
    args = p.parse_args()
    import triton.testing

    from quantune import kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    widths = [int(w) for w in args.widths.split(",")] if dev == "cuda" else [576]
    tokens = args.tokens if dev == "cuda" else 4
    bench = (lambda f: triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3) if dev == "cuda" \
        else (lambda f: (f(), 0.0)[1])  # microseconds
    pres = [(ch, nw, ga) for ch in (512, 1024, 2048, 4096) for nw in (4, 8) for ga in (False, True)] \
        if dev == "cuda" else [(256, 4, False), (128, 2, True)]
    posts = [(ch, nw) for ch in (512, 1024, 2048, 4096) for nw in (4, 8)] if dev == "cuda" else [(256, 4)]
    out = []
    for k in widths:
        lin = torch.nn.Linear(k, 8, bias=False, device=dev, dtype=torch.bfloat16)
        q, _ = QuantLinear.from_linear(lin, QuantConfig(bits=4))
        form = q.bitplane_form()
        g = form.group
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        want = kernels.transformed_input(x.float(), form)
        t_torch = bench(lambda: kernels.transformed_input(x.float(), form).to(torch.bfloat16))
        base = dict(k=k, group=g, tokens=tokens, torch_dct_us=t_torch, bytes_x=x.numel() * 2)
        v = kernels.prefill_dct_pre(x, form, 1024, 4, False)
        spectrum = kernels.prefill_dct_spectrum(v, form)
        t_rfft = bench(lambda: kernels.prefill_dct_spectrum(v, form))
        for ch, nw, ga in pres:
            t = bench(lambda ch=ch, nw=nw, ga=ga: kernels.prefill_dct_pre(x, form, ch, nw, ga))
            same = bool(torch.equal(kernels.prefill_dct_spectrum(kernels.prefill_dct_pre(x, form, ch, nw, ga), form),
                                    spectrum))
            row = {**base, "pass": "pre", "columns": ch, "warps": nw, "gather": ga, "us": t, "equal": same}
            print(json.dumps(row), flush=True)
            out.append(row)
        out.append({**base, "pass": "rfft", "us": t_rfft})
        for ch, nw in posts:
            t = bench(lambda ch=ch, nw=nw: kernels.prefill_dct_post(spectrum, form, torch.bfloat16, ch, nw))
            xq = kernels.prefill_dct_post(spectrum, form, torch.bfloat16, ch, nw)
            err = float((xq.float() - want).norm() / want.norm())
            row = {**base, "pass": "post", "columns": ch, "warps": nw, "us": t, "rel_err_vs_torch": err}
            print(json.dumps(row), flush=True)
            out.append(row)
        t_whole = bench(lambda: kernels.prefill_transformed_input(x, form, torch.bfloat16))
        got = kernels.prefill_transformed_input(x, form, torch.float32)
        row = {**base, "pass": "whole (library tiles)", "tiles": list(map(list, kernels.PREFILL_DCT_TILES)),
               "us": t_whole, "rfft_us": t_rfft, "rel_err_vs_torch": float((got - want).norm() / want.norm())}
        print(json.dumps(row), flush=True)
        out.append(row)
        want = v = xq = spectrum = None
    save_sweep(out, "sweep_prefill_dct", ("k", "pass"), "us")


if __name__ == "__main__":
    main()
