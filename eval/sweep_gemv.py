"""Sweep: the few-token GEMV (quantune.kernels.gemv_matmul) over rows per program, warps, words per tile
and the K split, on the four benchmark shapes for the given formats (rtn: group 64, as in bench_kernels),
one token. Per config the kernel alone on an input prepared beforehand, CUDA-graph medians, the bytes it
reads (codes plus the coefficient tables it loads) per second, and whether its output equals the default
config's bitwise (else its relative difference: a split of 2 adds two float32 parts); then the whole call
the module makes (quantune.kernels.fused_matmul: input preparation and the default tile) against bf16
cuBLAS in the same run. Every timed call cycles through copies of the weights (bench_kernels.cold_copies:
512 MB or more together), so none finds its weights in L2. Writes $OUT/sweep_gemv.json. Run on the GPU:
``python eval/sweep_gemv.py``; without one it checks itself under TRITON_INTERPRET=1 on a small shape and
times nothing."""
import argparse
import json
import re

import torch

from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear

CONFIGS = [(1, 1, 128), (1, 1, 256), (2, 1, 128), (2, 1, 256), (4, 1, 128), (4, 1, 64), (8, 1, 64), (2, 2, 128),
           (4, 2, 128), (8, 2, 128), (4, 4, 128), (8, 4, 128), (8, 8, 128), (16, 4, 128)]


def parse_config(c: str) -> tuple:
    """"4x1x64" -> (4, 1, 64); a "uN" suffix unrolls the K loop N times: "1x1x128u2" -> (1, 1, 128, 2).
    (The "p" and "p2" suffixes, prefetching, went with the kernel's PREFETCH in the twenty-seventh session.)"""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:u(\d+))?", c)
    if m is None:
        raise SystemExit(f"bad config {c!r}: rows x warps x words, then uN (e.g. 1x1x128u2)")
    tile = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return tile + (int(m.group(4)),) if m.group(4) else tile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--configs", default=None, help="rows x warps x words per tile, 'uN' to unroll the K loop, "
                                                   "e.g. 4x1x64,2x1x128u2")
    p.add_argument("--whole-configs", default=None, help="tiles (as --configs) to time the module's whole call "
                                                         "with, in place of the library's choice (gemv_tile); 'default': "
                                                         "the library's")
    p.add_argument("--splits", default="1,2")
    p.add_argument("--group", default="64", help="rtn's group size, or 'row' (one scale per row, as the generation "
                                                 "benchmark quantizes)")
    p.add_argument("--evict", default="", help="L2 eviction policies of the codes' loads to try, e.g. ',evict_first'")
    p.add_argument("--prep-pdl", default="", help="for the whole call: quantune.kernels.PREP_PDL settings to try "
                                                  "(0/1: the input preparation launched plainly or with PDL), "
                                                  "default the library's")
    p.add_argument("--prep-warps", default="", help="for the whole call: quantune.kernels.PREP_WARPS settings to try "
                                                    "(warps per program of the input preparation), default the library's")
    p.add_argument("--prep-xd", default="", help="for the whole call: quantune.kernels.PREP_XD settings to try (0/1: "
                                                 "mode 6's preparation skips or writes the float32 input)")
    p.add_argument("--late", default="", help="for the whole call: quantune.kernels.GEMV_LATE settings to try (0/1: "
                                              "kashin's GEMV in one pass, or x's planes then xq's, on every layer "
                                              "size), default the library's")
    p.add_argument("--prep-columns", default="", help="quantune.kernels.PREP_COLUMNS settings to try (columns per "
                                                      "program of the input preparation and per 16-bit rounding "
                                                      "scale of mode 6, which bounds its tile: 1024 holds 64 words "
                                                      "at 2 bits; given, it holds on long rows too, in place of "
                                                      "ROUNDING_COLUMNS_LONG), e.g. 1024,2048; default the library's")
    p.add_argument("--prep-split", default="", help="for the whole call: quantune.kernels.PREP_SPLIT settings to try "
                                                     "(mode 6: preparation programs per chunk of the input's rounding, "
                                                     "for chunks wider than PREP_COLUMNS)")
    p.add_argument("--span", default="", help="rtn's mode 6: tiles that may cover two chunks of the input's rounding "
                                              "(quantune.kernels.gemv_matmul's span), 0/1 settings to try on every "
                                              "config and whole call; default: off for the configs, the library's "
                                              "choice (gemv_span) for the whole calls")
    p.add_argument("--modes", default="", help="GEMV modes to time (quantune.kernels.GEMV_MODES), e.g. 6,5 for rtn: "
                                               "each config alone and each whole call (as kernels.GEMV_MODE_CODES, "
                                               "or GEMV_MODE_DOTS for kashin); default the library's")
    args = p.parse_args()
    from eval import bench_kernels
    from quantune import kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kernels.DEV = dev
    rotating = bench_kernels.rotating
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if dev == "cuda" else [(128, 32)]
    configs = [parse_config(c) for c in args.configs.split(",")] if args.configs else list(CONFIGS)
    wholes = [None if c == "default" else parse_config(c) for c in args.whole_configs.split(",")] \
        if args.whole_configs else [None]
    if dev != "cuda":
        configs = [(2, 1, 4), (1, 1, 8), (1, 1, 4, 2)]
        wholes = [None, (1, 1, 8, 2)]
    bench = bench_kernels.bench if dev == "cuda" else (lambda f: 0.0)  # seconds, CUDA-graph medians; none on the CPU
    out = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w16s = [lin.weight] + [lin.weight.detach().clone() for _ in range(bench_kernels.cold_copies(2 * k * n) - 1)]
        t_bf16 = bench(rotating([lambda w=w: x @ w.T for w in w16s]))
        w16s = None
        cols_list = [int(v) for v in args.prep_columns.split(",")] if args.prep_columns else [None]
        for spec, cols in [(s, c) for s in args.methods.split(",") for c in cols_list]:
            saved_cols = kernels.PREP_COLUMNS, kernels.ROUNDING_COLUMNS_LONG
            if cols is not None:
                kernels.PREP_COLUMNS, kernels.ROUNDING_COLUMNS_LONG = cols, {}
            method, bits = spec.split("-")
            bits = int(bits)
            group = bench_kernels.parse_group(args.group, "--group") if method == "rtn" else None
            cfg = QuantConfig(method=method, bits=bits, group_size=group)
            q, _ = QuantLinear.from_linear(lin, cfg)
            form, tables = q.bitplane_form(), q.level_tables()
            cols = kernels.rounding_columns(k, bits)
            affine = tables[2]
            mode0 = kernels.gemv_default_mode(affine, bits)
            modes = [int(v) for v in args.modes.split(",")] if args.modes else [mode0]
            preps = {md: kernels.prepared_input(x, form, bits, pairs=kernels.gemv_pairs(md), share=False)
                     for md in {mode0, *modes}}
            read = bench_kernels.kernel_bytes(q.codes, form, tables, affine)
            copies = bench_kernels.layer_copies(q.codes, form, tables, bench_kernels.cold_copies(read))
            bm0, nw0, bw0 = kernels.gemv_tile(n, affine, k, bits, form.group)
            split0 = kernels.gemv_split(n, form, bits, bm0, bw0)
            want = kernels.gemv_matmul(x, q.codes, form, bits, block_m=bm0, block_w=bw0, num_warps=nw0, split=split0,
                                       tables=tables, prepared=preps[mode0])
            spans = [bool(int(v)) for v in args.span.split(",")] if args.span else [None]
            variants = [(c, s, e, md, sp) for md in modes for c in configs for s in map(int, args.splits.split(","))
                        for e in args.evict.split(",") for sp in spans]
            for config, split, evict, mode, span in variants:
                bm, nw, bw, unroll = (*config, 1)[:4]
                if kernels.gemv_block_w(form, bits, bw, split) is None:
                    continue

                def call(layer=copies[0]):
                    codes, form_, tables_ = layer
                    return kernels.gemv_matmul(x, codes, form_, bits, block_m=bm, block_w=bw, num_warps=nw,
                                               split=split, tables=tables_, prepared=preps[mode], evict=evict,
                                               unroll=unroll, mode=mode, span=bool(span))
                try:
                    got = call()
                    t = bench(rotating([lambda c=c: call(c) for c in copies]))
                except Exception as exc:  # a config that does not compile here
                    print(f"{spec} {k}x{n} {bm}x{nw}x{bw} split {split}: {type(exc).__name__}: {exc}"[:200])
                    continue
                err = float((got - want).norm() / want.norm())
                row = dict(k=k, n=n, method=spec, group=args.group, prep_columns=cols, mode=mode, block_m=bm, warps=nw, block_w=bw,
                           unroll=unroll, span=bool(span), split=split, evict=evict,
                           kernel_us=t * 1e6 if t else None, read_GBps=read / t / 1e9 if t else None,
                           bf16_us=t_bf16 * 1e6, kernel_x_bf16=t_bf16 / t if t else None,
                           equal=bool(torch.equal(got, want)), rel_diff=err,
                           default=(mode, bm, nw, bw, split) == (mode0, bm0, nw0, bw0, split0))
                print(json.dumps(row), flush=True)
                out.append(row)

            def whole(layer):  # the module's call, the input's preparation included (no reuse across calls)
                kernels._PREPARED.clear()
                return kernels.fused_matmul(x, layer[0], layer[1], bits, layer[2], out_dtype=x.dtype)
            pdls = [bool(int(v)) for v in args.prep_pdl.split(",")] if args.prep_pdl else [kernels.PREP_PDL]
            warps_list = [int(v) for v in args.prep_warps.split(",")] if args.prep_warps else [kernels.PREP_WARPS]
            splits_list = [int(v) for v in args.prep_split.split(",")] if args.prep_split else [kernels.PREP_SPLIT]
            xds = [bool(int(v)) for v in args.prep_xd.split(",")] if args.prep_xd else [kernels.PREP_XD]
            lates = [bool(int(v)) for v in args.late.split(",")] if args.late else [None]
            settings = [(v, w, pw, xd, md, lt, sp, ps) for md in modes for v in pdls for w in wholes
                        for pw in warps_list for xd in xds for lt in lates for sp in spans for ps in splits_list]
            for prep_pdl, tile, prep_warps, prep_xd, mode, late, span, prep_split in settings:
                saved = (kernels.PREP_PDL, kernels.gemv_tile, kernels.gemv_unroll, kernels.PREP_WARPS, kernels.PREP_XD,
                         kernels.GEMV_MODE_CODES, kernels.GEMV_MODE_DOTS, kernels.GEMV_LATE, kernels.LATE_MAX_BYTES,
                         kernels.gemv_span, kernels.PREP_SPLIT)
                if span is not None:
                    kernels.gemv_span = lambda *a, span=span, **kw: bool(span)
                kernels.PREP_PDL, kernels.PREP_WARPS, kernels.PREP_XD = prep_pdl, prep_warps, prep_xd
                kernels.PREP_SPLIT = prep_split
                if late is not None:  # on every layer size
                    kernels.GEMV_LATE, kernels.LATE_MAX_BYTES = late, 1 << 40
                late_used = kernels.gemv_late(form, bits, mode, q.codes, kernels.pdl_enabled(x))
                if affine:
                    kernels.GEMV_MODE_CODES = mode
                else:
                    kernels.GEMV_MODE_DOTS = mode
                if tile is not None:  # the tile as named: unrolled only where it says so
                    kernels.gemv_tile = lambda *a, tile=tile, **kw: tile[:3]
                    kernels.gemv_unroll = lambda *a, tile=tile, **kw: (*tile, 1)[3]
                try:
                    got = whole(copies[0])
                    t_whole = bench(rotating([lambda c=c: whole(c) for c in copies]))
                finally:
                    (kernels.PREP_PDL, kernels.gemv_tile, kernels.gemv_unroll, kernels.PREP_WARPS, kernels.PREP_XD,
                     kernels.GEMV_MODE_CODES, kernels.GEMV_MODE_DOTS, kernels.GEMV_LATE, kernels.LATE_MAX_BYTES,
                     kernels.gemv_span, kernels.PREP_SPLIT) = saved
                used = list((*tile, 1)[:4]) if tile is not None else \
                    [bm0, nw0, bw0, kernels.gemv_unroll((bm0, nw0, bw0), affine, bits, k, n, form.group)]
                row = dict(k=k, n=n, method=spec, group=args.group, prep_columns=cols, mode=mode, span=span,
                           whole_call_us=t_whole * 1e6 if t_whole else None,
                           late=late_used, prep_pdl=prep_pdl, prep_warps=prep_warps, prep_xd=prep_xd,
                           prep_split=prep_split, tile=used,
                           default_tile=[bm0, nw0, bw0, split0], bf16_us=t_bf16 * 1e6,
                           whole_x_bf16=t_bf16 / t_whole if t_whole else None, bytes_read=read,
                           whole_rel_diff=float((got.float() - want).norm() / want.norm()))
                print("whole", json.dumps(row), flush=True)
                out.append(row)
            q = copies = None
            kernels.PREP_COLUMNS, kernels.ROUNDING_COLUMNS_LONG = saved_cols
    bench_kernels.save_sweep(out, "sweep_gemv", ("k", "n", "method"), "kernel_us")


if __name__ == "__main__":
    main()
