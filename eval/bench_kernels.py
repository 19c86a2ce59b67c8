"""Low-bit matmul speed on one GPU: quantune's fused kernel vs bf16 cuBLAS vs bitsandbytes NF4.

    python -m eval.bench_kernels --out eval/results/bench_kernels

For every (in, out) shape: random weights (std 0.02), quantized by quantune (kashin and rtn,
4 and 2 bits) and by bitsandbytes NF4; x random bf16. Decode (1 token): the fused bit-plane
kernel (quantune.kernels), torch bf16 ``x @ W^T``, ``bnb.matmul_4bit``. Prefill (2048 tokens):
quantune decodes the weight to bf16 and runs one GEMM (timed together) against bf16 GEMM.
Correctness: every kernel output is compared with the float32 reference (``x @ W_hat^T`` from
the module's own dequantization) in the same run. The table states the measured device read
bandwidth (a streaming Triton read; copy bandwidths next to it) and each case's byte floor (bytes read /
read bandwidth). Decode timings cycle through copies
of each case's weights (``cold_copies``) so that no call is served from L2, as in a model.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


DEV = "cuda"
KASHIN_TIED = 0  # kashin's QuantConfig.tied_steps in the bench's layers (--kashin-tied)
COLD_BYTES = 512 << 20  # what the timed calls of a case read in turn: ten times the H200's 50 MB L2


def cold_copies(nbytes: int) -> int:
    """How many copies of a case's weights (``nbytes`` each) the timed calls cycle through, so that a call
    never finds its weights in L2 from the call before (in a model the other layers evict them): enough
    for COLD_BYTES, at most 64 (one on the CPU)."""
    return 1 if DEV == "cpu" else max(1, min(64, -(-COLD_BYTES // nbytes)))


def probe_device() -> str:
    """"cuda" where a GPU is present, else "cpu", also set as :data:`DEV`. Without a GPU the Triton kernels must run
    under the interpreter, which Triton reads when the kernels are defined (on import), so setting it from inside a
    script is too late: a one-line exit asks for it instead."""
    import os

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU here: run with TRITON_INTERPRET=1 set before Python starts (the CPU check mode)")
    return DEV


def rotating(calls: list):
    """One callable running ``calls`` in turn: each call a CUDA graph captures takes the next one."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


FORM_TENSORS = ("a", "bx", "bq", "c")  # what a BitplaneForm may carry (c: kashin's float16 coefficients)


def layer_copies(codes: torch.Tensor, form, tables: tuple, n: int) -> list[tuple]:
    """``n`` copies (the first the original) of what the few-token kernels read: codes, bit-plane form (the
    tensors it carries), level tables."""
    def clone(t):
        return t.clone() if isinstance(t, torch.Tensor) else t
    return [(codes, form, tables)] + [
        (codes.clone(), dataclasses.replace(form, **{f: clone(getattr(form, f, None)) for f in FORM_TENSORS
                                                     if getattr(form, f, None) is not None}),
         tuple(clone(t) for t in tables)) for _ in range(n - 1)]


def save_sweep(rows: list, name: str, key: tuple, metric: str) -> None:
    """A sweep's rows as ``$OUT/NAME.json``; prints the row with the least ``metric`` per ``key`` (row
    fields; rows without the metric are skipped)."""
    import os

    folder = Path(os.environ.get("OUT", "/tmp/out"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
    best = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        k = tuple(r[f] for f in key)
        if k not in best or r[metric] < best[k][metric]:
            best[k] = r
    for r in best.values():
        print("best", json.dumps(r), flush=True)


def kernel_bytes(codes: torch.Tensor, form, tables: tuple, affine: bool) -> int:
    """Bytes one few-token call reads from its weights: codes, and rtn's scale (offset) tables or
    kashin's coefficients."""
    coeff = [t for t in tables[:2] if t is not None] if affine else \
        [getattr(form, f) for f in FORM_TENSORS if getattr(form, f, None) is not None]
    return codes.numel() * codes.element_size() + sum(t.numel() * t.element_size() for t in coeff)


def rtn_cases(shapes: list[tuple[int, int]], methods: str, group: int | None, tokens: int = 1,
              time_bf16: bool = True, kashin_group: int | None = None):
    """The rtn probes' cases: per ``(k, n)`` shape a seeded bf16 Linear and input of ``tokens`` rows (timed as
    bf16 ``x @ W^T``, cold, where DEV is cuda and ``time_bf16``), then per method ("rtn-4,rtn-2"; kashin's too,
    with ``kashin_group``, per row by default: ``group`` is rtn's) its quantized layer. Yields namespaces with k, n, x, spec,
    bits, q, form, tables, copies (:func:`layer_copies`, cold), bf16_s (None where not timed) and group_label
    (rtn's group as reports name it, "row" for one a row; None for kashin)."""
    from types import SimpleNamespace

    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear

    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device=DEV, dtype=torch.bfloat16)
        bf16_s = None
        if DEV == "cuda" and time_bf16:
            w16s = [lin.weight] + [lin.weight.detach().clone() for _ in range(cold_copies(2 * k * n) - 1)]
            bf16_s = bench(rotating([lambda w=w: x @ w.T for w in w16s]))
            del w16s
        for spec in methods.split(","):
            method, bits = spec.split("-")
            rtn = method == "rtn"
            q, _ = QuantLinear.from_linear(lin, QuantConfig(method=method, bits=int(bits),
                                                            group_size=group if rtn else kashin_group,
                                                            tied_steps=0 if rtn else KASHIN_TIED))
            form, tables = q.bitplane_form(), q.level_tables()
            copies = layer_copies(q.codes, form, tables, cold_copies(kernel_bytes(q.codes, form, tables, True)))
            yield SimpleNamespace(k=k, n=n, x=x, spec=spec, bits=int(bits), q=q, form=form, tables=tables,
                                  copies=copies, bf16_s=bf16_s,
                                  group_label=(str(group) if group else "row") if rtn else
                                  (str(kashin_group) if kashin_group else None))


def library_call(x: torch.Tensor, bits: int, kernels=None, out_dtype: torch.dtype | None = None):
    """The library's whole few-token call on ``x`` for a layer of :func:`layer_copies` (the preparation not shared
    with the call before); ``kernels``: a version of quantune.kernels (default the package's); ``out_dtype``: of
    the result (default x's, as the module runs it)."""
    if kernels is None:
        from quantune import kernels

    def call(layer):
        kernels._PREPARED.clear()
        return kernels.fused_matmul(x, layer[0], layer[1], bits, layer[2], out_dtype=out_dtype or x.dtype)
    return call


def _wall(fn, reps: int = 3) -> float:
    """--smoke on the CPU: a plain wall-clock median (checks the script, measures nothing useful)."""
    import time

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(fn, reps: int = 50) -> float:
    """Median seconds per call with the calls captured in a CUDA graph (no launch overhead: what a
    decode loop under CUDA graphs or torch.compile sees); eager timing when capture fails."""
    if DEV == "cpu":
        return _wall(fn)
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=reps, return_mode="median") / 1e3
    except Exception:  # not capturable
        torch.cuda.synchronize()
        return do_bench(fn, rep=reps, return_mode="median") / 1e3


def bench_eager(fn, reps: int = 50) -> float:
    """Median seconds per call launched from Python (includes launch overhead)."""
    if DEV == "cpu":
        return _wall(fn)
    from triton.testing import do_bench

    return do_bench(fn, rep=reps, return_mode="median") / 1e3


def bandwidths() -> dict:
    """The device's memory bandwidth in bytes/s, three ways over 1 GiB: ``read``, a streaming read by a Triton
    kernel (16 KB a program, CUDA graph; eval/probe_read_pattern.py), the floor of what a GEMV's code reads can
    reach and the one the tables' floors use; ``copy_eager`` and ``copy_graph``, ``Tensor.copy_`` (read + write
    counted) launched eagerly and captured in a CUDA graph (a graph's memcpy node ran at 2.7 TB/s on the H200
    against 4.2 eagerly, so it is no floor). On the CPU: a 1 MiB copy for all three."""
    a = torch.empty(1 << (30 if DEV == "cuda" else 20), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    copy = 2 * a.numel() / bench(lambda: b.copy_(a))
    if DEV != "cuda":
        return {"read": copy, "copy_eager": copy, "copy_graph": copy}
    from eval.probe_read_pattern import eager_seconds, read_blocks

    words = a.view(torch.int32)
    return {"read": a.numel() / bench(lambda: read_blocks(words)),
            "copy_eager": 2 * a.numel() / eager_seconds(lambda: b.copy_(a)), "copy_graph": copy}


def read_only_seconds(nbytes: int) -> float:
    """Seconds to stream ``nbytes`` from memory and do nothing else: the streaming Triton read of
    :func:`bandwidths` (16 KB a program) over a buffer of that size, cold (cycling through copies, as the
    decode calls do), CUDA graph. What no kernel reading those bytes can beat on this device: the fixed cost of
    a short read (ramp and tail, ~1.5 us on the H200) included, which the bytes / bandwidth floor leaves out.
    A GEMV's codes and tables read this way give the case's bound against bf16; bf16's own weight bytes give
    cuBLAS's. On the CPU (--smoke): a wall-clock sum."""
    if DEV != "cuda":
        buf = torch.zeros(max(1, nbytes // 4), dtype=torch.int32)
        return _wall(lambda: buf.sum())
    from eval.probe_read_pattern import read_blocks

    block = 4096  # int32 words a program, as in bandwidths()
    words = -(-nbytes // (4 * block)) * block
    bufs = [torch.zeros(words, dtype=torch.int32, device=DEV) for _ in range(cold_copies(4 * words))]
    t = bench(rotating([lambda b=b: read_blocks(b, block) for b in bufs]))
    del bufs
    return t


def quantune_layer(w: torch.Tensor, method: str, bits: int, rtn_group: int | None = 64,
                   kashin_group: int | None = None):
    """The bench's quantized layer of weight ``w``: kashin with coefficients per ``kashin_group`` columns (None: per
    row, the library's default), or symmetric rtn with one scale per ``rtn_group`` columns (None: one a row, the
    library's default)."""
    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=DEV)
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = QuantConfig(method=method, bits=bits, group_size=rtn_group if method == "rtn" else kashin_group,
                      tied_steps=KASHIN_TIED if method == "kashin" else 0)
    q, _ = QuantLinear.from_linear(lin, cfg)
    return q


def parse_group(text: str, option: str = "--rtn-group") -> int | None:
    """rtn's scale group as the eval scripts take it (``option`` names it in the error): a column count, or "row"
    for one scale a row."""
    if text == "row":
        return None
    try:
        group = int(text)
    except ValueError:
        raise SystemExit(f"{option}: a column count or 'row', got {text!r}") from None
    if group < 8:
        raise SystemExit(f"{option}: at least 8 columns, got {group}")
    return group


# (kernel, rows per program, warps, words per tile) tried per case: "planes" = bit-plane dot products,
# "levels" = per-row level tables (kashin) or the affine grid (rtn), both reading a byte per code;
# "gemvN" = codes read as 32-bit words, decoded by register arithmetic in mode N
# (quantune.kernels.GEMV_MODES: 5 kashin's plane sums as int16 dp2a dot products, 6 rtn's whole codes as int16 dp2a
# dot products), the K split chosen by quantune.kernels.gemv_split; a
# "uN" suffix unrolls the K loop N times. Triton's loop pipelining ("gemv6s3") measured 2.5-4x slower and was
# removed (eval/results/kernel_sweeps/bench_kernels_stages.md)
CONFIGS = [("gemv5", 16, 4, 64), ("gemv5", 8, 8, 128), ("gemv5", 8, 4, 64), ("gemv5", 16, 4, 32), ("gemv5", 32, 4, 32),
           ("gemv5", 4, 4, 128), ("gemv5", 4, 1, 128), ("gemv5", 8, 1, 64), ("gemv5", 4, 1, 64), ("gemv5", 8, 2, 128),
           ("gemv5", 2, 1, 128),
           ("gemv6", 4, 1, 128), ("gemv6", 2, 1, 128), ("gemv6", 8, 1, 128), ("gemv6", 4, 4, 128), ("gemv6", 8, 8, 128),
           ("gemv6", 16, 8, 128), ("gemv6", 32, 4, 64), ("gemv6", 8, 2, 128)]
# earlier sweeps (eval/results/kernel_sweeps/): "planes"/"levels" kernels, gemv modes 0, 2, 3, 4 (on the formats
# that have modes 5 or 6) and prefetching the next tile ("p", "p2") never won; modes 0 to 4 and prefetching were
# removed from the kernel in the twenty-seventh session


def render(rows: list, device: str, n_configs: int, prefill_tokens: int, rtn_group: int | None = 64,
           kashin_group: int | None = None) -> str:
    """The Markdown report of a run's rows (also: ``--render RESULTS.json`` re-renders a saved run); ``rtn_group``:
    the run's rtn layers' scale group (None: one scale a row); ``kashin_group``: kashin's (None: per row)."""
    us = 1e6
    rtn_setting = (f"one float16 scale per {rtn_group} columns" if rtn_group else
                   "one float16 scale a row (the library's default, as the generation benchmark quantizes)")
    table = markdown_table(
        ["in x out", "method", "bits/weight", "kernel", "rel. err", "decode us", "library us (tile, unroll)", "x bf16, library",
         "x NF4, library", "decode us, no PDL", "decode us, one pass", "decode us, rfft prep",
         "kernel us", "kernel GB/s",
         "torch transform us", "floor us", "read-only us", "bound x bf16",
         "bf16 us", "bf16 read-only us", "NF4 us", "x bf16", "x NF4", "prefill ms", "bf16 prefill ms", "prefill x bf16",
         "prefill rel. err", "bf16 rel. err", "decode to bf16 us (float32 planes)", "prefill DCT us (torch DCT us)",
         "prefill ms, torch DCT", "joined decode us (float32 planes)", "prefill ms, two GEMMs", "old prefill ms"],
        [[f"{r['in']}x{r['out']}", r["method"],
          f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-", "{kernel}:{block_m}x{num_warps}x{block_w}".format(**r["best_config"]),
          r["rel_err_vs_reference"], r["decode_s"] * us,
          "{:.3f} ({}, u{}{})".format(r["decode_library_s"] * us, "x".join(map(str, r["library_config"]["tile"][:3])),
                                     r["library_config"]["unroll"], ", late" if r["library_config"]["late"] else "")
          if "decode_library_s" in r else "-",
          f"{r['speedup_vs_bf16_library']:.3f}" if "decode_library_s" in r else "-",
          f"{r['speedup_vs_nf4_library']:.3f}" if "decode_library_s" in r else "-",
          (f"{r['decode_no_pdl_s'] * us:.3f}" + ("" if r.get("pdl_equals_serial", True) else
                                                  f" (rel. diff {r['pdl_rel_diff']:.0e})" if "pdl_rel_diff" in r
                                                  else " (not bitwise equal)"))
          if "decode_no_pdl_s" in r else "-",
          f"{r['decode_one_pass_s'] * us:.3f}" if "decode_one_pass_s" in r else "-",
          f"{r['decode_rfft_s'] * us:.3f} (rel. err {r['rfft_rel_err_vs_reference']:.1e})" if "decode_rfft_s" in r else "-",
          r["kernel_s"] * us,
          f"{r['kernel_read_Bps'] / 1e9:.0f}" if r.get("kernel_read_Bps") else "-",
          r["transform_s"] * us, r["floor_s"] * us,
          f"{r['read_only_s'] * us:.3f}" if "read_only_s" in r else "-",
          f"{r['bf16_decode_s'] / r['read_only_s']:.2f}" if "read_only_s" in r else "-",
          r["bf16_decode_s"] * us, f"{r['bf16_read_only_s'] * us:.3f}" if "bf16_read_only_s" in r else "-",
          r["nf4_decode_s"] * us,
          r["speedup_vs_bf16"], r["speedup_vs_nf4"], r["prefill_s"] * 1e3, r["bf16_prefill_s"] * 1e3,
          r["prefill_vs_bf16"], r["prefill_rel_err"], r["bf16_prefill_rel_err"],
          f"{r['decode_bf16_s'] * us:.3f} ({r['decode_bf16_planes_s'] * us:.3f})" if "decode_bf16_planes_s" in r
          else r["decode_bf16_s"] * us,
          f"{r['prefill_dct_s'] * us:.1f} ({r['prefill_torch_dct_s'] * us:.1f}), rel. err "
          f"{r['prefill_dct_rel_err']:.1e}" if "prefill_dct_s" in r else "-",
          f"{r['prefill_with_torch_dct_s'] * 1e3:.3f}" if "prefill_with_torch_dct_s" in r else "-",
          f"{r['decode_joined_s'] * us:.3f} ({r['decode_joined_planes_s'] * us:.3f})" if "decode_joined_planes_s" in r
          else f"{r['decode_joined_s'] * us:.3f}" if "decode_joined_s" in r else "-",
          f"{r['prefill_two_gemm_s'] * 1e3:.3f}" if "prefill_two_gemm_s" in r else "-",
          r["old_prefill_s"] * 1e3] for r in rows])
    kashin_setting = (f"coefficients per {kashin_group} columns (prefill decodes the whole weight U + V Q^T, "
                      f"quantune.kernels.decode_joined_bf16, then one GEMM: 'joined decode us' that decode alone, "
                      f"'prefill ms, two GEMMs' the two-GEMM path in the same run)" if kashin_group else
                      "its own per-row codebooks")
    if KASHIN_TIED:
        kashin_setting += f", U's {KASHIN_TIED} smallest steps tied (QuantConfig.tied_steps)"
    return (f"# Low-bit matmul kernels\n\nDevice: {device}. Formats: kashin with {kashin_setting}; rtn "
            f"symmetric round-to-nearest, {rtn_setting}; 'bits/weight' counts the codes and every scale or "
            f"coefficient the layer stores. Times are medians with the calls captured in a CUDA "
            f"graph (triton.testing.do_bench_cudagraph); the decode calls (bf16, NF4 and quantune alike) cycle "
            f"through copies of the case's weights, {COLD_BYTES >> 20} MB or more together, so no call finds its "
            f"weights in L2 from the call before (as in a model, whose other layers evict them). 'kernel GB/s': "
            f"the bytes the GEMV reads from the weights (codes and the coefficient tables it loads) per second. Decode: 1 token; 'decode us' is everything a call does "
            f"(input preparation: cast, de-interleave, the "
            f"16-bit inputs of modes 5 and 6, kashin's DCT in two Triton launches (a two-stage FFT, "
            f"quantune.kernels.dft_split); then the GEMV kernel, launched with programmatic dependent launch so it "
            f"loads codes while the preparation runs (kashin on 4096-wide inputs: in two passes over the codes, "
            f"x's planes while the transform's last launch runs, then xq's, quantune.kernels.gemv_late; 'one pass': "
            f"the GEMV after the whole preparation, same run); 'library us': the same call through the module's own "
            f"dispatch (quantune.kernels.fused_matmul: the library's tile, K-loop unroll and split, with what "
            f"QuantLinear's kernel path passes, kashin's stored float16 coefficients where quantune.kernels.HALF_COEFFS; "
            f"the 'x bf16, library' and 'x NF4, library' columns are this call's; the other columns read kashin's "
            f"float32 planes); 'no PDL': launched plainly, same run, outputs "
            f"checked equal; "
            f"'rfft prep': kashin's earlier preparation, same run (prep kernel, cuFFT rfft, post and pairs kernels), "
            f"its error against the reference), "
            f"'kernel us' the GEMV kernel alone on inputs prepared "
            f"beforehand, for the best of {n_configs} kernel/tile configs (gemvMODE:rows x warps x words, "
            f"quantune.kernels.GEMV_MODES), 'torch transform us' the plain torch DCT for reference. Prefill: "
            f"{prefill_tokens} tokens, quantune decodes the factors to bf16 with a Triton kernel, then cuBLAS (rtn: "
            f"one GEMM; kashin: x U^T + (x Q) V^T, two GEMMs, xq = Q^T x by quantune.kernels."
            f"prefill_transformed_input: two Triton passes around one batched rfft); 'prefill DCT us': that "
            f"transform alone into bf16, next to the torch DCT (quantune.transforms, float32 in, cast to bf16), "
            f"its error against the float32 torch DCT; 'prefill ms, torch DCT': the whole prefill with the torch "
            f"DCT, same run; 'old prefill' is the first path (float32 torch decode, eager). "
            f"Floor: index + coefficient bytes / read bandwidth. 'read-only us': the time to merely stream the "
            f"bytes the GEMV reads (codes and coefficient tables; 'bf16 read-only us': the bf16 weight's bytes) with "
            f"that streaming read kernel, cold, same run: unlike the floor it includes a short read's fixed ramp and "
            f"tail, so 'bound x bf16' (bf16 us / read-only us) is the most any kernel reading these bytes could reach "
            f"against this run's cuBLAS, before any arithmetic or input preparation. rel. err: the decode path vs the "
            f"float32 reference x W_hat^T (modes 5 and 6 round the input to 16 bits per token or per 1024 columns: about 3e-5 to 1e-4); "
            f"prefill rel. err the same for the bf16 prefill path, next to bf16 cuBLAS's own error against "
            f"float32 (x W^T).\n\n{table}\n")


def gemv_variant(kind: str) -> tuple[int | None, int]:
    """``gemvMODE[uN]`` -> (mode, unroll): "gemv5" -> (5, 1), "gemv6u2" (the K loop unrolled twice) -> (6, 2),
    "gemv" -> (None, 1) (the format's default mode)."""
    import re

    found = re.fullmatch(r"gemv(\d*)(?:u(\d+))?", kind)
    if found is None:
        raise ValueError(f"unknown kernel {kind!r}: gemvMODE[uN], e.g. gemv6, gemv6u2")
    mode, unroll = found.groups()
    return (int(mode) if mode else None), int(unroll or 1)


def gemv_mode(kind: str) -> int | None:
    return gemv_variant(kind)[0]


def parse_configs(text: str) -> list[tuple]:
    """``planes:4x1,gemv:8x4x64`` -> [(kind, rows, warps, words)]."""
    out = []
    for c in text.split(","):
        kind, dims = c.split(":")
        nums = list(map(int, dims.split("x")))
        out.append((kind, nums[0], nums[1], nums[2] if len(nums) > 2 else 0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES))
    p.add_argument("--methods", default="kashin-4,kashin-2,rtn-4,rtn-2")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--configs", default=None, help="configs to try, e.g. planes:4x1,gemv:8x4x64 "
                                                   "(kernel:rows x warps [x words per tile])")
    p.add_argument("--block-k", type=int, default=None, help="K tile (default: the largest power of two <= 256 "
                                                              "dividing the group)")
    p.add_argument("--rtn-group", default="64", help="rtn's scale group in columns, or 'row' for one scale a row "
                                                      "(the library's default; the generation benchmark's)")
    p.add_argument("--kashin-group", default="row", help="kashin's coefficient group in columns, or 'row' (the "
                                                          "library's default)")
    p.add_argument("--kashin-tied", type=int, default=0, help="kashin's tied steps (QuantConfig.tied_steps)")
    p.add_argument("--out", default="eval/results/bench_kernels")
    p.add_argument("--smoke", action="store_true", help="CPU check of the script under TRITON_INTERPRET=1 "
                                                        "(small shape, no NF4); measures nothing")
    p.add_argument("--render", metavar="RESULTS_JSON", help="re-render the Markdown of a saved run and exit")
    args = p.parse_args()
    rtn_group = parse_group(args.rtn_group)
    kashin_group = parse_group(args.kashin_group, "--kashin-group")
    global KASHIN_TIED
    KASHIN_TIED = args.kashin_tied
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        n = len(saved["rows"][0]["config_seconds"]) if saved["rows"] else 0
        Path(args.render).with_suffix(".md").write_text(render(saved["rows"], saved["device"], n, 2048,
                                                               saved.get("rtn_group", 64), saved.get("kashin_group")))
        return
    global DEV
    if args.smoke:
        DEV, args.shapes, args.prefill_tokens = "cpu", "256x96", 24
    else:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

    from quantune import kernels
    from quantune.kernels import (bitplane_matmul, decode_bf16, gemv_matmul, gemv_split, gemv_supported, level_tables,
                                  levels_matmul, prefill_matmul, transformed_input)

    configs = parse_configs(args.configs) if args.configs else CONFIGS
    bws = bandwidths()
    bw = bws["read"]
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k, device=DEV) * 0.02
        w16 = w.to(torch.bfloat16)
        x1 = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        xp = torch.randn(args.prefill_tokens, k, device=DEV, dtype=torch.bfloat16)
        w16s = [w16] + [w16.clone() for _ in range(cold_copies(w16.numel() * 2) - 1)]
        t_bf16 = bench(rotating([lambda w=w: x1 @ w.T for w in w16s]))
        w16s = None
        t_bf16_eager = bench_eager(lambda: x1 @ w16.T)
        t_bf16_prefill = bench(lambda: xp @ w16.T)
        if args.smoke:
            t_nf4 = float("nan")
        else:
            nf4 = [bnbf.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
                   for _ in range(cold_copies(n * k // 2))]
            t_nf4 = bench(rotating([lambda p=p, st=st: bnb.matmul_4bit(x1, p.t(), quant_state=st) for p, st in nf4]))
            nf4 = None
        base = {"in": k, "out": n, "bf16_decode_s": t_bf16, "bf16_decode_eager_s": t_bf16_eager,
                "bf16_prefill_s": t_bf16_prefill, "nf4_decode_s": t_nf4, "bf16_floor_s": 2 * n * k / bw,
                "nf4_floor_s": (n * k / 2 + n * k / 64) / bw, "bf16_read_only_s": read_only_seconds(2 * n * k)}
        for spec in args.methods.split(","):
            method, bits = spec.split("-")
            bits = int(bits)
            q = quantune_layer(w, method, bits, rtn_group, kashin_group)
            form = q.bitplane_form()
            ref = x1.float() @ q.dequantize().T
            x32 = x1.float().contiguous()
            xq = transformed_input(x32, form).float().contiguous()
            tables = level_tables(form, bits)
            read_bytes = kernel_bytes(q.codes, form, tables, tables[2])
            copies = layer_copies(q.codes, form, tables, cold_copies(read_bytes))
            t_read_only = read_only_seconds(read_bytes)

            def kernel_call(kind, bm, nw, tw, xq_arg, layer=None):
                codes, form, tables = layer or copies[0]
                if kind == "planes":
                    return lambda: bitplane_matmul(x1, codes, form, bits, block_m=bm, num_warps=nw, xq=xq_arg,
                                                   block_k=args.block_k)
                if kind.startswith("gemv"):
                    split = gemv_split(codes.shape[0], form, bits, bm, tw)
                    mode, unroll = gemv_variant(kind)
                    # xq given: the kernel alone (inputs prepared once, outside the timing)
                    pairs = kernels.gemv_pairs(kernels.gemv_default_mode(tables[2], bits) if mode is None else mode)
                    prepared = None if xq_arg is None else kernels.prepared_input(x1, form, bits, xq_arg, pairs=pairs)

                    def call():
                        if xq_arg is None:  # time the input's preparation too (no reuse across calls)
                            kernels._PREPARED.clear()
                        return gemv_matmul(x1, codes, form, bits, block_m=bm, block_w=tw, num_warps=nw,
                                           split=split, xq=xq_arg, affine=tables[2], mode=mode, tables=tables,
                                           prepared=prepared, unroll=unroll)
                    return call
                return lambda: levels_matmul(x1, codes, form, bits, tables=tables, block_m=bm, num_warps=nw,
                                             xq=xq_arg, block_k=args.block_k)

            def timed(kind, bm, nw, tw, xq_arg):  # the calls cycle through the weights' copies (cold L2)
                return bench(rotating([kernel_call(kind, bm, nw, tw, xq_arg, layer=c) for c in copies]))

            timings, errors = {}, {}
            for kind, bm, nw, tw in configs:  # the kernel alone, input transform precomputed
                if kind.startswith("gemv") and not gemv_supported(form, bits, q.codes.shape[1]):
                    continue
                mode = gemv_mode(kind) if kind.startswith("gemv") else None
                if mode == 6 and not tables[2]:  # rtn's affine codes on kashin
                    continue
                if mode == 5 and tables[2]:  # kashin's planes on rtn: slower than mode 6 (kernel_sweeps/)
                    continue
                if mode in (5, 6) and bits not in (2, 4, 8):
                    continue
                try:
                    call = kernel_call(kind, bm, nw, tw, xq)
                    got = call()
                    errors[(kind, bm, nw, tw)] = float((got - ref).norm() / ref.norm())
                    timings[(kind, bm, nw, tw)] = timed(kind, bm, nw, tw, xq)
                except Exception as exc:  # a config that does not compile here
                    print(f"config {kind} {bm}x{nw}x{tw}: {type(exc).__name__}: {exc}"[:200], flush=True)
            (kind, bm, nw, tw), t_kernel = min(timings.items(), key=lambda kv: kv[1])
            got = kernel_call(kind, bm, nw, tw, None)()
            rel = float((got - ref).norm() / ref.norm())
            t_full = timed(kind, bm, nw, tw, None)
            kernels.GEMV_PDL = False  # the same call without programmatic dependent launch, same run
            try:
                got_serial = kernel_call(kind, bm, nw, tw, None)()
                t_serial = timed(kind, bm, nw, tw, None)
            finally:
                kernels.GEMV_PDL = True
            pdl_same = bool(torch.equal(got_serial, got))
            # kashin under PDL runs its two-pass GEMV (x's planes, then xq's: see kernels.gemv_late), whose float
            # sums are added in another order than the one-pass kernel's without PDL: equal up to rounding
            pdl_diff = float((got_serial - got).norm() / got.norm())
            default_mode = kernels.gemv_default_mode(tables[2], bits)
            best_mode = default_mode if gemv_mode(kind) is None else gemv_mode(kind)
            one_pass = {}
            if kernels.gemv_late(form, bits, best_mode, q.codes, kernels.pdl_enabled(x1)):
                kernels.GEMV_LATE = False  # kashin's GEMV in one pass after the whole preparation, same run
                try:
                    got_one = kernel_call(kind, bm, nw, tw, None)()
                    one_pass = {"decode_one_pass_s": timed(kind, bm, nw, tw, None),
                                "late_vs_one_pass_rel_diff": float((got - got_one).norm() / got_one.norm())}
                finally:
                    kernels.GEMV_LATE = True

            def library(layer):  # the module's own dispatch (tile, unroll, split, late), preparation included
                kernels._PREPARED.clear()
                return kernels.fused_matmul(x1, layer[0], layer[1], bits, layer[2], out_dtype=x1.dtype)
            # what QuantLinear's kernel path passes (kashin: the stored float16 coefficients, quantune.kernels.
            # HALF_COEFFS; rtn: its stored scales), as many copies as the planes' for the same cold reads
            lib_copies = layer_copies(q.codes, q.kernel_form(), q.kernel_tables(), len(copies))
            got_lib = library(lib_copies[0])
            t_lib = bench(rotating([lambda c=c: library(c) for c in lib_copies]))
            lib_tile = kernels.gemv_tile(n, tables[2], k, bits, form.group)
            lib = {"decode_library_s": t_lib,
                   "library_rel_err_vs_reference": float((got_lib.float() - ref).norm() / ref.norm()),
                   "library_config": {"tile": list(lib_tile),
                                      "unroll": kernels.gemv_unroll(lib_tile, tables[2], bits, k, n, form.group),
                                      "late": kernels.gemv_late(form, bits, default_mode, q.codes,
                                                                kernels.pdl_enabled(x1))},
                   "speedup_vs_bf16_library": t_bf16 / t_lib, "speedup_vs_nf4_library": t_nf4 / t_lib}
            rfft = {}
            if kernels.dct_two_stage(form, bits, kernels.gemv_pairs(best_mode)):
                kernels.DCT_TWO_STAGE = False  # kashin's input through the rfft path (prep, rfft, post, pairs), same run
                try:
                    got_rfft = kernel_call(kind, bm, nw, tw, None)()
                    rfft = {"decode_rfft_s": timed(kind, bm, nw, tw, None),
                            "rfft_rel_err_vs_reference": float((got_rfft - ref).norm() / ref.norm()),
                            "two_stage_vs_rfft_rel_diff": float((got - got_rfft).norm() / got_rfft.norm())}
                finally:
                    kernels.DCT_TWO_STAGE = True
            t_transform = bench(lambda: transformed_input(x32, form)) if form.transform else 0.0
            with torch.no_grad():
                t_module = t_module_eager = bench_eager(lambda: (kernels._PREPARED.clear(), q(x1))[1])  # from Python
                t_old_prefill = bench_eager(lambda: xp @ q.dequantize().to(torch.bfloat16).T)
                kform, ktables = q.kernel_form(), q.kernel_tables()  # the library's (kashin: float16 coefficients)
                t_decode = bench(lambda: decode_bf16(q.codes, kform, bits, k, tables=ktables))
                t_decode_planes = bench(lambda: decode_bf16(q.codes, form, bits, k, mode=0))  # float32 planes
                t_q_prefill = bench(lambda: prefill_matmul(xp, q.codes, kform, bits, tables=ktables))
                got_p = prefill_matmul(xp[:64], q.codes, kform, bits, tables=ktables).float()
                joined = {}
                if kernels.joined_decode_supported(form, bits):  # kashin in small groups: one GEMM, against two
                    joined["decode_joined_s"] = bench(lambda: kernels.decode_joined_bf16(q.codes, kform, bits, k))
                    joined["decode_joined_planes_s"] = bench(lambda: kernels.decode_joined_bf16(q.codes, form, bits, k))
                    kernels.JOINED_PREFILL = False
                    try:
                        joined["prefill_two_gemm_s"] = bench(lambda: prefill_matmul(xp, q.codes, kform, bits,
                                                                                    tables=ktables))
                    finally:
                        kernels.JOINED_PREFILL = True
                prefill_dct = {}
                if form.ku < bits and form.transform == "dct":  # prefill's DCT passes against the torch DCT, same run
                    want_xq = transformed_input(xp.float(), form)
                    prefill_dct = {
                        "prefill_dct_s": bench(lambda: kernels.prefill_transformed_input(xp, form, torch.bfloat16)),
                        "prefill_dct_rel_err": float(
                            (kernels.prefill_transformed_input(xp, form, torch.float32) - want_xq).norm()
                            / want_xq.norm())}
                    want_xq = None
                    kernels.PREFILL_DCT = False
                    try:
                        prefill_dct["prefill_torch_dct_s"] = bench(lambda: transformed_input(
                            xp.float(), form).to(torch.bfloat16))
                        prefill_dct["prefill_with_torch_dct_s"] = bench(
                            lambda: prefill_matmul(xp, q.codes, form, bits, tables=tables))
                    finally:
                        kernels.PREFILL_DCT = True
                got_m = q(xp[:64]).float()  # the module's own dispatch for 64 tokens
            ref_p = xp[:64].float() @ q.dequantize().T
            index_bytes = q.codes.numel()
            meta_bytes = sum(t.numel() * t.element_size() for name, t in q.buffers_dict().items() if name != "codes")
            row = {**base, "method": spec, "rtn_group": rtn_group if method == "rtn" else None,
                   "kashin_group": kashin_group if method == "kashin" else None,
                   "bits_per_weight": 8 * (index_bytes + meta_bytes) / (n * k), "rel_err_vs_reference": rel,
                   "prefill_rel_err": float((got_p - ref_p).norm() / ref_p.norm()),
                   "module_prefill_rel_err": float((got_m - ref_p).norm() / ref_p.norm()),
                   "bf16_prefill_rel_err": float((xp[:64] @ w16.T).float().sub(xp[:64].float() @ w.T).norm()
                                                 / (xp[:64].float() @ w.T).norm()),
                   "best_config": {"kernel": kind, "block_m": bm, "num_warps": nw, "block_w": tw},
                   "config_seconds": {f"{c}:{a}x{b}x{d}": v for (c, a, b, d), v in timings.items()},
                   "config_rel_err": {f"{c}:{a}x{b}x{d}": v for (c, a, b, d), v in errors.items()},
                   "decode_bf16_s": t_decode, "decode_bf16_planes_s": t_decode_planes,
                   "old_prefill_s": t_old_prefill,
                   "kernel_s": t_kernel, "decode_s": t_full, "decode_no_pdl_s": t_serial,
                   "pdl_equals_serial": pdl_same, "pdl_rel_diff": pdl_diff, **one_pass, **lib, **rfft, "transform_s": t_transform, "module_s": t_module,
                   "module_eager_s": t_module_eager, "prefill_s": t_q_prefill, **prefill_dct, **joined,
                   "floor_s": (index_bytes + meta_bytes) / bw, "read_only_s": t_read_only,
                   "speedup_vs_bf16": t_bf16 / t_full, "speedup_vs_nf4": t_nf4 / t_full,
                   "kernel_speedup_vs_bf16": t_bf16 / t_kernel, "kernel_read_bytes": read_bytes,
                   "kernel_read_Bps": read_bytes / t_kernel if t_kernel else None, "weight_copies": len(copies), "prefill_vs_bf16": t_bf16_prefill / t_q_prefill}
            print(json.dumps(row), flush=True)
            rows.append(row)
            q = tables = copies = None  # free the layer before the next case
    device = (f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__}, read "
              f"bandwidth {bw / 1e9:.0f} GB/s (a Triton kernel streaming 1 GiB; Tensor.copy_ {bws['copy_eager'] / 1e9:.0f} "
              f"GB/s eager, {bws['copy_graph'] / 1e9:.0f} GB/s in a CUDA graph, read + write counted)")
    out = Path(args.out)
    md = render(rows, device, len(configs), args.prefill_tokens, rtn_group, kashin_group)
    write_results(out, {"device": device, "rtn_group": rtn_group, "kashin_group": kashin_group, "read_bandwidth_Bps": bw, "copy_eager_Bps": bws["copy_eager"],
                        "copy_graph_Bps": bws["copy_graph"], "rows": rows}, md)


if __name__ == "__main__":
    main()
