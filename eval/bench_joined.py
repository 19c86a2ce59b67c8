"""Layers that read one input in one GEMV launch (quantune.qlinear.colocate) against a launch each,
8B-shaped q/k/v (4096 -> 4096, 1024, 1024) and gate/up (4096 -> 14336, 14336), one token, bf16 in and
out, rtn and kashin at 4 and 2 bits: CUDA-graph medians of the whole call (input preparation once per
group in both: the sharing cache), outputs compared. Writes $OUT/bench_joined.json and .md.
Run on the GPU: ``python -m eval.bench_joined``."""
import json
import os

import torch

from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear, _joined_forward, colocate
from quantune.report import markdown_table, write_results


def main() -> None:
    import triton.testing

    from quantune import kernels

    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    bench = lambda f: triton.testing.do_bench_cudagraph(f, rep=200, return_mode="median") * 1e3  # noqa: E731
    rows = []
    for spec in ("rtn-4", "rtn-2", "kashin-4", "kashin-2"):
        method, bits = spec.split("-")
        cfg = QuantConfig(method=method, bits=int(bits))
        for name, outs in (("q/k/v", (4096, 1024, 1024)), ("gate/up", (14336, 14336))):
            torch.manual_seed(0)
            layers = []
            for n in outs:
                lin = torch.nn.Linear(4096, n, bias=False, device="cuda", dtype=torch.bfloat16)
                layers.append(QuantLinear.from_linear(lin, cfg)[0])
            x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

            def separate():
                kernels._PREPARED.clear()
                return [m._kernel_forward(x, share=True) for m in layers]

            with torch.no_grad():
                want = separate()
                t_sep = bench(separate)
                colocate(layers)

                def joined():
                    kernels._PREPARED.clear()
                    return _joined_forward(layers, x)

                got = joined()
                t_join = bench(joined)
            err = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
            row = dict(method=spec, layers=name, separate_us=t_sep, joined_us=t_join, speedup=t_sep / t_join,
                       max_abs_diff=err)
            print(json.dumps(row), flush=True)
            rows.append(row)
    dev = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    md = (f"# One GEMV launch for layers that read one input\n\nDevice: {dev}. One token, bf16; 'separate': a "
          f"launch per layer (the input prepared once, shared); 'joined': the layers' codes stored back to back "
          f"(quantune.qlinear.colocate), one launch with an output per layer. CUDA-graph medians.\n\n"
          + markdown_table(["method", "layers", "separate us", "joined us", "x", "max abs diff"],
                           [[r["method"], r["layers"], r["separate_us"], r["joined_us"], r["speedup"],
                             r["max_abs_diff"]] for r in rows]) + "\n")
    write_results(os.path.join(os.environ.get("OUT", "/tmp/out"), "bench_joined"), {"device": dev, "rows": rows}, md)


if __name__ == "__main__":
    main()
