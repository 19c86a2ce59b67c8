"""What a quantized layer holds on the GPU once its kernels have run, beside what it stores: for each format, the
CUDA allocator's bytes still allocated after a few-token call and a prefill call (caches: kernel forms, level
tables, transform matrices), per weight, with quantune.kernels.HALF_COEFFS on and off. Writes
$OUT/bench_layer_memory.json and prints a table. On the CPU (no kernel path) it counts the tensors the kernel
path would keep (QuantLinear.kernel_form / kernel_tables) instead, and times nothing.

    python -m eval.bench_layer_memory --shape 4096x14336
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

FORMATS = {"rtn-4 row": dict(method="rtn", bits=4), "rtn-4 g64": dict(method="rtn", bits=4, group_size=64),
           "kashin-4 row": dict(bits=4), "kashin-4 g128": dict(bits=4, group_size=128),
           "kashin-4 g64": dict(bits=4, group_size=64), "kashin-2 g64": dict(bits=2, group_size=64)}


def held_bytes(q) -> int:
    """Bytes of the kernel path's forms and tables that are not the layer's stored tensors."""
    stored = {t.untyped_storage().data_ptr() for t in q.buffers_dict().values()}
    form, tables = q.kernel_form(), q.kernel_tables()
    seen, total = set(), 0
    for t in (form.a, form.bx, form.bq, form.c, *tables[:2]):
        if t is not None and t.untyped_storage().data_ptr() not in stored | seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096x14336", help="IN x OUT")
    p.add_argument("--formats", default=",".join(FORMATS))
    args = p.parse_args()
    from quantune import kernels
    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k, n = map(int, args.shape.split("x")) if dev == "cuda" else (512, 256)
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    rows = []
    for name in args.formats.split(","):
        for half in (True, False):
            kernels.HALF_COEFFS = half
            q, _ = QuantLinear.from_linear(lin, QuantConfig(**FORMATS[name]))
            stored = sum(t.numel() * t.element_size() for t in q.buffers_dict().values())
            row = dict(format=name, half_coeffs=half, shape=[k, n], device=dev,
                       stored_bits_per_weight=8 * stored / (k * n))
            if dev == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                with torch.no_grad():
                    for tokens in (1, 2048):
                        q(torch.randn(tokens, k, device=dev, dtype=torch.bfloat16))
                torch.cuda.synchronize()
                kernels._PREPARED.clear()
                row["held_after_calls_bits_per_weight"] = 8 * (torch.cuda.memory_allocated() - before) / (k * n)
            row["kernel_path_copies_bits_per_weight"] = 8 * held_bytes(q) / (k * n)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q
    kernels.HALF_COEFFS = True
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_layer_memory.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'format':<14} {'half':<5} {'stored':>7} {'copies':>7} {'held on the GPU':>16}  (bits per weight)")
    for r in rows:
        held = r.get("held_after_calls_bits_per_weight")
        print(f"{r['format']:<14} {str(r['half_coeffs']):<5} {r['stored_bits_per_weight']:7.3f} "
              f"{r['kernel_path_copies_bits_per_weight']:7.3f} {'-' if held is None else f'{held:16.3f}'}")


if __name__ == "__main__":
    main()
