"""Probe: rtn's few-token GEMV with the input rounded to 8 bits (``dp4a``) instead of 16 (``dp2a``).

quantune's GEMV (mode 6, quantune.kernels) rounds the input to 16 bits per 1024- or 2048-column chunk and
multiplies two codes a ``dp2a``: about 1e-4 of error against the float32 product, far below bf16 cuBLAS's own
(2e-3). The fifteenth session's notes name the one arithmetic not tried: 8-bit inputs, four codes a ``dp4a``
(half the integer instructions and half the input bytes each code needs from L1), at the cost of accuracy. This
probe measures that trade, so it can be decided on figures:

- the input rounded to int8 with one scale per XC columns (``max |x| / 127``, XC = 32..256: per-block scales
  as in the OCP microscaling formats; XC = the weight's group where rtn has groups), written by a small
  preparation kernel in the byte order the codes' shift-and-mask puts them in (:func:`a8_inputs`);
- the GEMV: per word and byte group one shift, one mask and one ``dp4a`` (four codes), the integer dot summed
  per chunk, then ``xscale * dot`` per (row, chunk), and the offsets of rtn's grid from the chunk sums.

Per case it times, cold L2 (the calls cycle through copies of the weights) and in CUDA graphs, this path's
whole call (preparation + GEMV, chained by programmatic dependent launch as the library's) for each chunk
width and tile against the library's whole call and bf16 cuBLAS, same run; it checks the output against the
8-bit-rounded input times the dequantized weight (exact up to float32 sums) and reports the error against the
float32 product of the unrounded input, next to the library's and bf16 cuBLAS's. Writes
$OUT/probe_a8_gemv.json. On the CPU it checks the kernels under TRITON_INTERPRET=1 on a small shape and times
nothing. ``--sass`` compiles one config for sm_90 on this machine (no GPU) and prints its instruction count
next to the library GEMV's (instructions per K-loop iteration: ``loop_bodies``)."""
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
    from quantune.kernels import _affine, _gdc_wait, _pdl_start

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        """PTX ``dp4a.u32.s32``: ``c + sum_i a.byte_i * b.byte_i``, ``a`` four unsigned bytes (codes), ``b`` four
        signed bytes (the input); ASM=False computes the same with shifts (the CPU interpreter runs no PTX)."""
        if ASM:
            r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = (c + (a & 0xFF) * ((b << 24) >> 24) + ((a >> 8) & 0xFF) * ((b << 16) >> 24)
                 + ((a >> 16) & 0xFF) * ((b << 8) >> 24) + ((a >> 24) & 0xFF) * (b >> 24))
        return r

    @triton.jit
    def _round(v):
        """Round half away from zero to int32 (|v| <= 127 here)."""
        return tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)

    @triton.jit
    def _a8_prep_kernel(x_ptr, xp_ptr, sc_ptr, xg_ptr, K: tl.constexpr, XC: tl.constexpr, BITS: tl.constexpr,
                        PDL: tl.constexpr):
        """One XC-column chunk of one token: the int8 input ``q = round(x / s)``, ``s = max |x| / 127``, packed four
        to a word in byte group order (``xp[t, k, w]`` byte i holds column ``w * PER + i * CPB + k``: the codes
        that ``(word >> k BITS) & mask`` puts into byte i), the scale ``sc[t, c] = s`` and ``xg[t, c] = s * sum q``
        (the rounded input's sum, for the offsets of rtn's grid)."""
        _pdl_start(PDL, PDL)
        PER: tl.constexpr = 32 // BITS
        CPB: tl.constexpr = 8 // BITS
        WPC: tl.constexpr = XC // PER
        NW: tl.constexpr = K // PER
        tok = tl.program_id(0)
        ch = tl.program_id(1)
        kk = tl.arange(0, CPB)[:, None]
        ww = tl.arange(0, WPC)[None, :]
        base = x_ptr + tok * K + ch * XC + ww * PER + kk
        x0 = tl.load(base).to(tl.float32)
        x1 = tl.load(base + CPB).to(tl.float32)
        x2 = tl.load(base + 2 * CPB).to(tl.float32)
        x3 = tl.load(base + 3 * CPB).to(tl.float32)
        amax = tl.max(tl.max(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                             axis=1), axis=0)
        scale = tl.maximum(amax, 1e-30) / 127.0
        inv = 1.0 / scale
        q0 = _round(x0 * inv)
        q1 = _round(x1 * inv)
        q2 = _round(x2 * inv)
        q3 = _round(x3 * inv)
        word = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | (q3 << 24)
        tl.store(xp_ptr + (tok * CPB + kk) * NW + ch * WPC + ww, word)
        total = tl.sum(tl.sum(q0 + q1 + q2 + q3, axis=1), axis=0)
        tl.store(sc_ptr + tok * (K // XC) + ch, scale)
        tl.store(xg_ptr + tok * (K // XC) + ch, scale * total.to(tl.float32))

    @triton.jit
    def _a8_gemv_kernel(w_ptr, xp_ptr, sc_ptr, xg_ptr, a_ptr, bx_ptr, y_ptr, M, stride_w, groups,
                        K: tl.constexpr, GROUP: tl.constexpr, XC: tl.constexpr, BITS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, SYM: tl.constexpr, PDL: tl.constexpr,
                        ASM: tl.constexpr, EVICT: tl.constexpr = "evict_first", UNROLL: tl.constexpr = 1):
        """y[tok, rows] for one block of BLOCK_M rows over tiles of BLOCK_W words: per byte group one shift, one
        mask and one ``dp4a`` with the 8-bit input of :func:`_a8_prep_kernel`; the dots summed per XC-column chunk
        and scaled by the chunk's input scale; rtn's scale and offset per row (GROUP >= K) or per group (XC =
        GROUP)."""
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = K // PER
        CPB: tl.constexpr = 8 // BITS
        WPC: tl.constexpr = XC // PER
        CPT: tl.constexpr = BLOCK_W // WPC
        NCH: tl.constexpr = K // XC
        ONE: tl.constexpr = GROUP >= K
        MASK: tl.constexpr = ((1 << BITS) - 1) * 0x01010101
        pid = tl.program_id(0)
        tok = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        wtile = tl.broadcast_to(tl.arange(0, BLOCK_W)[None, :], (BLOCK_M, BLOCK_W))
        cl = tl.broadcast_to(tl.arange(0, CPT)[None, :], (BLOCK_M, CPT))
        acc = tl.zeros([BLOCK_M, CPT], dtype=tl.float32)
        xacc = tl.zeros([BLOCK_M, CPT], dtype=tl.float32)
        for w0 in tl.range(0, NW, BLOCK_W, loop_unroll_factor=UNROLL):
            word = tl.load(w_ptr + rows[:, None] * stride_w + w0 + wtile, mask=rmask[:, None], other=0,
                           eviction_policy=EVICT)
            if PDL:
                if w0 == 0:  # the first words are on their way: now wait for the preparation
                    _gdc_wait()
            dot = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32)
            for k in tl.static_range(CPB):
                b = (word >> (k * BITS)) & MASK
                xk = tl.load(xp_ptr + (tok * CPB + k) * NW + w0 + wtile)
                dot = _dp4a(b, xk, dot, ASM)
            dsum = tl.sum(tl.reshape(dot, (BLOCK_M, CPT, WPC)), axis=2).to(tl.float32)
            ch = w0 // WPC + cl
            xs = tl.load(sc_ptr + tok * NCH + ch)
            xg = tl.load(xg_ptr + tok * NCH + ch)
            if ONE:
                acc += xs * dsum
                xacc += xg
            else:
                cs, co = _affine(a_ptr, bx_ptr, rows[:, None] * groups + (ch * XC) // GROUP, rmask[:, None], SYM,
                                 BITS)
                acc += cs * (xs * dsum) + co * xg
        if ONE:
            s, o = _affine(a_ptr, bx_ptr, rows[:, None], rmask[:, None], SYM, BITS)
            out = tl.sum(s * acc + o * xacc, axis=1)
        else:
            out = tl.sum(acc, axis=1)
        tl.store(y_ptr + tok * M + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)


def a8_inputs(x: torch.Tensor, bits: int, xc: int, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xp, sc, xg)`` of :func:`_a8_prep_kernel` for ``x`` ``(T, K)``."""
    t, k = x.shape
    per, cpb = 32 // bits, 8 // bits
    xp = torch.empty(t, cpb, k // per, device=x.device, dtype=torch.int32)
    sc = torch.empty(t, k // xc, device=x.device, dtype=torch.float32)
    xg = torch.empty_like(sc)
    _a8_prep_kernel[(t, k // xc)](x.contiguous(), xp, sc, xg, K=k, XC=xc, BITS=bits, PDL=pdl, num_warps=1,
                                  **({"launch_pdl": True} if pdl else {}))
    return xp, sc, xg


def a8_matmul(x: torch.Tensor, codes: torch.Tensor, form, bits: int, tables: tuple, xc: int, block_m: int,
              block_w: int, warps: int, out_dtype: torch.dtype | None = None, unroll: int = 1,
              prepared: tuple | None = None) -> torch.Tensor:
    """x W^T ``(T, out)`` through the 8-bit input path: rtn codes of ``bits`` bits, one scale a row or groups
    of ``xc`` columns. ``prepared``: :func:`a8_inputs`' output, to time the GEMV alone."""
    (t, k), m = x.shape, codes.shape[0]
    per = 32 // bits
    group = form.group
    if group < k and group != xc:
        raise ValueError(f"with rtn groups of {group} the input chunk must be the group, not {xc}")
    if k % xc or xc % per or block_w % (xc // per) or (k // per) % block_w:
        raise ValueError(f"tile of {block_w} words / chunk of {xc} columns does not fit rows of {k}")
    pdl = kernels.pdl_enabled(x)
    asm = x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    xp, sc, xg = prepared or a8_inputs(x, bits, xc, pdl)
    w = codes.view(torch.int32)
    a, bx, sym = kernels.affine_args(tables)
    y = torch.empty(t, m, device=x.device, dtype=out_dtype or x.dtype)
    _a8_gemv_kernel[(triton.cdiv(m, block_m), t)](
        w, xp, sc, xg, a, bx, y, m, w.stride(0), form.bx.shape[1], K=k, GROUP=group, XC=xc, BITS=bits,
        BLOCK_M=block_m, BLOCK_W=block_w, SYM=sym, PDL=pdl, ASM=asm, UNROLL=unroll, num_warps=warps,
        **({"launch_pdl": True} if pdl else {}))
    return y


def a8_dequantized(x: torch.Tensor, bits: int, xc: int) -> torch.Tensor:
    """The input exactly as the preparation kernel rounded it (its int8 values times its scales), float32: the
    reference the GEMV must match up to float32 sums (the GPU's division differs from torch's by an ulp, which
    moves a few roundings off :func:`chunk_rounded`)."""
    t, k = x.shape
    per, cpb = 32 // bits, 8 // bits
    xp, sc, _ = a8_inputs(x, bits, xc)
    q = torch.stack([(xp << (24 - 8 * i)) >> 24 for i in range(4)], dim=-1)  # (T, CPB, NW, 4): byte i
    q = q.permute(0, 2, 3, 1).reshape(t, k).float()  # column w * PER + i * CPB + kk
    return (q.view(t, k // xc, xc) * sc[:, :, None]).view(t, k)


def chunk_rounded(x: torch.Tensor, cols: int) -> torch.Tensor:
    """``x`` rounded to int8 with one scale per ``cols`` columns (the probe's rounding), dequantized, float32."""
    t, k = x.shape
    chunks = x.float().view(t, k // cols, cols)
    scale = chunks.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    q = chunks / scale
    return (torch.where(q >= 0, torch.floor(q + 0.5), torch.ceil(q - 0.5)) * scale).view(t, k)


def sass_report(bits: int, group: int, xc: int, k: int, block_m: int, block_w: int, warps: int) -> dict:
    """The probe's GEMV and the library's (mode 6, same tile, prepared input) compiled for sm_90."""
    from eval.sass_gemv import compile_gemv

    probe = compile_gemv({"K": k, "GROUP": group, "XC": xc, "BITS": bits, "BLOCK_M": block_m, "BLOCK_W": block_w,
                          "SYM": True, "PDL": True, "ASM": True}, num_warps=warps, kernel=_a8_gemv_kernel,
                         sass=("IDP", "LDG", "I2F", "FFMA"))
    lib = compile_gemv({"K": k, "GROUP": group, "BITS": bits, "KU": bits, "MODE": 6, "BLOCK_M": block_m,
                        "BLOCK_W": block_w, "SPLIT": 1, "ASM": True, "PDL": True, "SYM": True,
                        "XCH": 2048 if k >= 8192 else 1024, "EVICT": "evict_first"}, num_warps=warps,
                       sass=("IDP", "LDG", "I2F", "FFMA"))
    return {"probe": probe, "library": lib}


def parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    """``rowsxwarpsxwords[uN]`` tiles, comma-separated."""
    out = []
    for c in text.split(","):
        c, _, unroll = c.partition("u")
        bm, nw, bw = map(int, c.split("x"))
        out.append((bm, nw, bw, int(unroll or 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--configs", default="4x1x64,2x1x128,1x1x128,1x1x256,8x1x64", help="rows x warps x words[uN]")
    p.add_argument("--chunks", default="64,128,256", help="input scale chunks (columns) with one rtn scale a row")
    p.add_argument("--group", default="row", help="rtn's group size, or 'row'")
    p.add_argument("--sass", action="store_true", help="compile the first config for sm_90 (no GPU) and compare")
    args = p.parse_args()
    configs = parse_configs(args.configs)
    group = parse_group(args.group, "--group")
    chunks = [int(c) for c in args.chunks.split(",")] if group is None else [group]
    if args.sass:
        for spec in args.methods.split(","):
            bits = int(spec.split("-")[1])
            k = int(args.shapes.split(",")[0].split("x")[0])
            bm, nw, bw, _ = configs[0]
            rep = sass_report(bits, group or k, chunks[0], k, bm, bw, nw)
            print(json.dumps({"method": spec, "k": k, "config": configs[0][:3], "chunk": chunks[0], **{
                name: {key: r[key] for key in ("registers", "stack", "sass_instructions", "loop_bodies", "sass_count")}
                for name, r in rep.items()}}))
        return
    from eval import bench_kernels

    dev = bench_kernels.probe_device()
    if dev != "cuda":
        configs = [(4, 1, 8, 1), (2, 1, 16, 1)]
        chunks = [c for c in chunks if c <= 64] or [64] if group is None else chunks
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if dev == "cuda" else [(1024, 10)]
    bench, rotating = bench_kernels.bench, bench_kernels.rotating
    out, bad = [], []
    for case in bench_kernels.rtn_cases(shapes, args.methods, group):
        k, n, x, spec, bits, copies, t_bf16 = case.k, case.n, case.x, case.spec, case.bits, case.copies, case.bf16_s
        w = case.q.dequantize().float()
        exact = x.float() @ w.T  # float32 product of the unrounded input
        whole_lib = bench_kernels.library_call(x, bits)
        got_lib = bench_kernels.library_call(x, bits, out_dtype=torch.float32)(copies[0])
        t_lib = bench(rotating([lambda c=c: whole_lib(c) for c in copies])) if dev == "cuda" else None
        bf16_err = None
        if dev == "cuda":
            w16 = w.to(torch.bfloat16)
            bf16_err = float(((x @ w16.T).float() - exact).norm() / exact.norm())
        base = dict(k=k, n=n, method=spec, group=args.group, bf16_us=t_bf16 and t_bf16 * 1e6,
                    library_whole_us=t_lib and t_lib * 1e6, library_x_bf16=t_bf16 / t_lib if t_lib else None,
                    library_rel_err=float((got_lib - exact).norm() / exact.norm()), bf16_rel_err=bf16_err)
        print("library", json.dumps(base), flush=True)
        for xc in chunks:
            want = a8_dequantized(x, bits, xc) @ w.T
            rounding_gap = float((a8_dequantized(x, bits, xc) - chunk_rounded(x, xc)).norm() / x.float().norm())
            for bm, nw, bw, unroll in configs:
                def call(layer, bm=bm, nw=nw, bw=bw, unroll=unroll, xc=xc):
                    return a8_matmul(x, layer[0], layer[1], bits, layer[2], xc, bm, bw, nw, unroll=unroll)
                try:
                    got = a8_matmul(x, copies[0][0], copies[0][1], bits, copies[0][2], xc, bm, bw, nw,
                                    out_dtype=torch.float32, unroll=unroll)
                    t = bench(rotating([lambda c=c, f=call: f(c) for c in copies])) if dev == "cuda" else None
                    ready = a8_inputs(x, bits, xc)
                    t_kernel = bench(rotating([lambda c=c: a8_matmul(x, c[0], c[1], bits, c[2], xc, bm, bw, nw,
                                                                     unroll=unroll, prepared=ready)
                                               for c in copies])) if dev == "cuda" else None
                except Exception as exc:  # a config that does not compile or fit here
                    print(f"{spec} {k}x{n} {bm}x{nw}x{bw}u{unroll} chunk {xc}: {type(exc).__name__}: {exc}"[:300],
                          flush=True)
                    continue
                err = float((got - want).norm() / want.norm())
                row = dict(base, chunk=xc, config=[bm, nw, bw, unroll], whole_us=t and t * 1e6, kernel_us=t_kernel and t_kernel * 1e6,
                           whole_x_bf16=t_bf16 / t if t else None,
                           x_library=t_lib / t if t else None,
                           rel_err_vs_rounded=err, rounding_gap=rounding_gap,
                           rel_err=float((got - exact).norm() / exact.norm()))
                print(json.dumps(row), flush=True)
                out.append(row)
                if err > 1e-4:
                    bad.append(row)
                    print(f"{spec} {k}x{n} {bm}x{nw}x{bw} chunk {xc}: output off the 8-bit-rounded product "
                          f"({err:.2e})", flush=True)
    bench_kernels.save_sweep(out, "probe_a8_gemv", ("k", "n", "method"), "whole_us")
    if bad:
        raise SystemExit(f"{len(bad)} outputs off the 8-bit-rounded product (listed above)")


if __name__ == "__main__":
    main()
