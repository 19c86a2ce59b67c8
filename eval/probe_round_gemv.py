"""Probe: rtn's few-token GEMV (mode 6 arithmetic: codes as int16 dp2a dot products) that rounds its own input.
quantune's GEMV reads the input as 16-bit pairs, one scale per chunk of columns, written by a small preparation
kernel launched before it (quantune.kernels.prepared_input); that kernel's chain (it waits for the kernel before
it, the GEMV waits for its whole grid, then loads the pairs) costs about 1 us of a 5-12 us call
(eval/results/notes.md, fifteenth session). Here each program rounds the bf16 input of each word tile itself,
with one scale per tile (``max |x| / 32767`` over the tile's columns), and sums it per group for the offsets: no
preparation kernel, more arithmetic per tile, shared by the tile's rows. The hypothesis it tests: on the
many-row tiles (four rows share each input) the arithmetic costs less than the chain it removes.

Per case it times, cold L2 (the calls cycle through copies of the weights) and in CUDA graphs: this kernel's
whole call for each config (rows x warps x words) against the library's whole call (fused_matmul) and bf16,
same run; it checks the output against the input rounded per tile times the dequantized weight (exact up to
float32 sums) and against the library's. Writes $OUT/probe_round_gemv.json. On the CPU it checks the kernel
under TRITON_INTERPRET=1 on a small shape and times nothing. ``--sass`` compiles one config for sm_90 on this
machine (no GPU) and prints its instruction count next to the library GEMV's for the same tile."""
from __future__ import annotations

import argparse
import json
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from eval.bench_kernels import parse_group
from quantune import kernels

if triton is not None:
    from quantune.kernels import _affine, _gdc_wait, _mode6_dot

    @triton.jit
    def _round_pair(x_ptr, base, k: tl.constexpr, h: tl.constexpr, CPB: tl.constexpr, PER: tl.constexpr, inv,
                    offs):
        """Byte group ``k``'s half ``h`` (:func:`quantune.kernels.quantized_pairs`'s layout): the packed int16 pair
        of code positions ``j0 = k + 2 h CPB`` (low half) and ``j0 + CPB`` (high half) of the words ``offs``, from
        the input at ``base`` rounded with ``inv = 1 / scale``; and the pair's integer sum."""
        j0: tl.constexpr = k + 2 * h * CPB
        if k < CPB:
            a = tl.load(x_ptr + base + offs * PER + j0).to(tl.float32) * inv
            b = tl.load(x_ptr + base + offs * PER + j0 + CPB).to(tl.float32) * inv
            qa = tl.where(a >= 0, a + 0.5, a - 0.5).to(tl.int32)
            qb = tl.where(b >= 0, b + 0.5, b - 0.5).to(tl.int32)
            pair = (qa & 0xFFFF) | (qb << 16)
            total = qa + qb
        else:
            pair = tl.zeros_like(offs)
            total = tl.zeros_like(offs)
        return pair, total

    @triton.jit
    def _gemv6_round_kernel(w_ptr, x_ptr, a_ptr, bx_ptr, y_ptr, M, stride_w, groups,
                            K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_W: tl.constexpr, SYM: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
                            EVICT: tl.constexpr = "evict_first"):
        """y[tok, rows] for one block of BLOCK_M rows: mode 6 over tiles of BLOCK_W words, the input of each tile
        rounded to 16 bits here with the tile's own scale; groups of GROUP columns dividing the tile, or one
        group a row (GROUP >= K: the tile's sum is one part of it)."""
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = K // PER
        CPB: tl.constexpr = 8 // BITS
        SG: tl.constexpr = GROUP if GROUP < K else BLOCK_W * PER  # columns per sum: a group, or the tile
        SWPG: tl.constexpr = SG // PER
        GPT: tl.constexpr = BLOCK_W // SWPG
        WPG: tl.constexpr = GROUP // PER
        pid = tl.program_id(0)
        tok = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        wcols = tl.arange(0, BLOCK_W)
        wtile = tl.broadcast_to(wcols[None, :], (BLOCK_M, BLOCK_W))
        gl = tl.broadcast_to(tl.arange(0, GPT)[None, :], (BLOCK_M, GPT))
        accg = tl.zeros([BLOCK_M, GPT], dtype=tl.float32)
        base = tok * K
        for w0 in tl.range(0, NW, BLOCK_W):
            word = tl.load(w_ptr + rows[:, None] * stride_w + w0 + wtile, mask=rmask[:, None], other=0,
                           eviction_policy=EVICT)
            if PDL:
                if w0 == 0:  # the first words are on their way: now wait for the kernel that wrote the input
                    _gdc_wait()
            amax = tl.max(tl.abs(tl.load(x_ptr + base + w0 * PER + tl.arange(0, BLOCK_W * PER)).to(tl.float32)),
                          axis=0)
            scale = tl.maximum(amax, 1e-30) / 32767.0
            inv = 1.0 / scale
            offs = (w0 + wcols)[None, :]  # the input once a tile (not once a row), broadcast to the rows at the dot
            i0, s0 = _round_pair(x_ptr, base, 0, 0, CPB, PER, inv, offs)
            i1, s1 = _round_pair(x_ptr, base, 0, 1, CPB, PER, inv, offs)
            i2, s2 = _round_pair(x_ptr, base, 1, 0, CPB, PER, inv, offs)
            i3, s3 = _round_pair(x_ptr, base, 1, 1, CPB, PER, inv, offs)
            i4, s4 = _round_pair(x_ptr, base, 2, 0, CPB, PER, inv, offs)
            i5, s5 = _round_pair(x_ptr, base, 2, 1, CPB, PER, inv, offs)
            i6, s6 = _round_pair(x_ptr, base, 3, 0, CPB, PER, inv, offs)
            i7, s7 = _round_pair(x_ptr, base, 3, 1, CPB, PER, inv, offs)
            dot = _mode6_dot(word, i0, i1, i2, i3, i4, i5, i6, i7, CPB, BITS, ASM)
            xsum = tl.broadcast_to(s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7, (BLOCK_M, BLOCK_W))  # a word's input
            gcols = (w0 + gl * SWPG) // WPG
            cs, co = _affine(a_ptr, bx_ptr, rows[:, None] * groups + gcols, rmask[:, None], SYM, BITS)
            dsum = tl.sum(tl.reshape(dot, (BLOCK_M, GPT, SWPG)), axis=2).to(tl.float32)
            xg = tl.sum(tl.reshape(xsum, (BLOCK_M, GPT, SWPG)), axis=2).to(tl.float32)
            accg += scale * (cs * dsum + co * xg)
        tl.store(y_ptr + tok * M + rows, tl.sum(accg, axis=1), mask=rmask)


def round_gemv(x: torch.Tensor, codes: torch.Tensor, form, bits: int, tables: tuple, block_m: int, block_w: int,
               warps: int) -> torch.Tensor:
    """x W^T (T, out) float32 through _gemv6_round_kernel: rtn codes of ``bits`` bits, groups dividing the tile
    of ``block_w`` words or one group a row."""
    (t, k), m = x.shape, codes.shape[0]
    per = 32 // bits
    nw = k // per
    if nw % block_w or (form.group < k and (block_w * per) % form.group):
        raise ValueError(f"tile of {block_w} words does not fit groups of {form.group} columns / rows of {nw} words")
    w = codes.view(torch.int32)
    a, bx, sym = kernels.affine_args(tables)
    y = torch.empty(t, m, device=x.device, dtype=torch.float32)
    pdl = kernels.pdl_enabled(x)
    asm = x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    _gemv6_round_kernel[(triton.cdiv(m, block_m), t)](
        w, x.contiguous(), a, bx, y, m, w.stride(0), form.bx.shape[1], K=k, GROUP=form.group, BITS=bits,
        BLOCK_M=block_m, BLOCK_W=block_w, SYM=sym, PDL=pdl, ASM=asm, num_warps=warps,
        **({"launch_pdl": True} if pdl else {}))
    return y


def tile_rounded(x: torch.Tensor, cols: int) -> torch.Tensor:
    """``x`` rounded to 16 bits with one scale per ``cols`` columns (the probe's rounding)."""
    t, k = x.shape
    chunks = x.float().view(t, k // cols, cols)
    scale = chunks.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 32767
    return (torch.round(chunks / scale) * scale).view(t, k)


def sass_report(bits: int, group: int, k: int, block_m: int, block_w: int, warps: int) -> dict:
    """The probe's kernel and the library GEMV (mode 6, same tile, prepared input) compiled for sm_90: instructions."""
    from eval.sass_gemv import compile_gemv

    probe = compile_gemv({"K": k, "GROUP": group, "BITS": bits, "BLOCK_M": block_m, "BLOCK_W": block_w, "SYM": False,
                          "PDL": True, "ASM": True}, num_warps=warps, kernel=_gemv6_round_kernel,
                         sass=("IDP", "LDG", "I2F", "F2I"))
    lib = compile_gemv({"K": k, "GROUP": group, "BITS": bits, "KU": bits, "MODE": 6, "BLOCK_M": block_m,
                        "BLOCK_W": block_w, "SPLIT": 1, "ASM": True, "PDL": True, "XCH": 1024,
                        "EVICT": "evict_first"}, num_warps=warps, sass=("IDP", "LDG", "I2F", "F2I"))
    return {"probe": probe, "library": lib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--configs", default="4x1x64,2x1x128,8x1x64,8x2x64,4x1x32", help="rows x warps x words")
    p.add_argument("--group", default="64", help="rtn's group size, or 'row'")
    p.add_argument("--sass", action="store_true", help="compile the first config for sm_90 (no GPU) and compare")
    args = p.parse_args()
    configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
    group = parse_group(args.group, "--group")
    if args.sass:
        for spec in args.methods.split(","):
            bits = int(spec.split("-")[1])
            k = int(args.shapes.split(",")[0].split("x")[0])
            bm, nw, bw = configs[0]
            rep = sass_report(bits, group or k, k, bm, bw, nw)
            print(json.dumps({"method": spec, "k": k, "config": configs[0], **{
                name: {key: r[key] for key in ("registers", "stack", "sass_instructions", "sass_count")}
                for name, r in rep.items()}}))
        return
    from eval import bench_kernels

    dev = bench_kernels.probe_device()
    if dev != "cuda":
        configs = [(4, 1, 8), (2, 1, 16)]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if dev == "cuda" else [(1024, 10)]
    bench = bench_kernels.bench
    rotating = bench_kernels.rotating
    out = []
    for case in bench_kernels.rtn_cases(shapes, args.methods, group):
        k, n, x, spec, bits, copies, t_bf16 = case.k, case.n, case.x, case.spec, case.bits, case.copies, case.bf16_s
        whole_lib = bench_kernels.library_call(x, bits)
        want_lib = whole_lib(copies[0]).float()
        t_lib = bench(rotating([lambda c=c: whole_lib(c) for c in copies])) if dev == "cuda" else None
        w = case.q.dequantize().float()
        base = dict(k=k, n=n, method=spec, group=args.group, bf16_us=t_bf16 and t_bf16 * 1e6,
                    library_whole_us=t_lib and t_lib * 1e6,
                    library_x_bf16=t_bf16 / t_lib if t_lib else None)
        print("library", json.dumps(base), flush=True)
        for bm, nw, bw in configs:
            def call(layer):
                return round_gemv(x, layer[0], layer[1], bits, layer[2], bm, bw, nw).to(x.dtype)
            try:
                got = round_gemv(x, copies[0][0], copies[0][1], bits, copies[0][2], bm, bw, nw)
                t = bench(rotating([lambda c=c: call(c) for c in copies])) if dev == "cuda" else None
            except Exception as exc:  # a config that does not compile or fit here
                print(f"{spec} {k}x{n} {bm}x{nw}x{bw}: {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            want = tile_rounded(x, bw * (32 // bits)) @ w.T
            err = float((got - want).norm() / want.norm())
            row = dict(base, config=[bm, nw, bw], whole_us=t and t * 1e6, whole_x_bf16=t_bf16 / t if t else None,
                       rel_err_vs_tile_rounded=err,
                       rel_diff_vs_library=float((got - want_lib).norm() / want_lib.norm()))
            print(json.dumps(row), flush=True)
            out.append(row)
            if err > 1e-4:
                raise SystemExit(f"{spec} {k}x{n} {bm}x{nw}x{bw}: output off the tile-rounded product ({err:.2e})")
    bench_kernels.save_sweep(out, "probe_round_gemv", ("k", "n", "method"), "whole_us")


if __name__ == "__main__":
    main()
