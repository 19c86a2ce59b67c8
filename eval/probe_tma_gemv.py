"""Probe: rtn's few-token GEMV (mode 6 arithmetic: codes as int16 dp2a dot products) with its weight-side reads
(codes, group scales and offsets) brought in by the Hopper bulk tensor copy engine (TMA, Triton tensor
descriptors), several shared-memory stages deep (Triton's loop pipelining), in persistent programs that walk
over (row block, K tile) pairs as one flat loop, so a program keeps STAGES - 1 tiles of codes in flight without
registers and the loads never wait behind the arithmetic. The hypothesis it tests: quantune's GEMV
(quantune.kernels._gemv_kernel) is latency-bound (issue slots 28-37% busy, 61-77% of stalls on global loads:
kernel_sweeps/ncu_gemv_*.txt), one DRAM round trip per tile and warp, with too few bytes in flight per SM.

Per case it times, cold L2 (the calls cycle through copies of the weights) and in CUDA graphs: the kernel alone
on a prepared input for each config (rows x warps x words x stages x programs per SM), the library's GEMV alone
(same prepared input), and the whole call both ways (input preparation included); it checks the output against
the library's. Writes $OUT/probe_tma_gemv.json. On the CPU it checks the kernel under TRITON_INTERPRET=1 on a
small shape and times nothing."""
from __future__ import annotations

import argparse
import json
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    triton = None

from quantune import kernels

if triton is not None:
    from quantune.kernels import _gdc_wait, _mode6_dot, _pairs8

    @triton.jit
    def _gemv6_tma_kernel(w_desc, s_desc, o_desc, xp_ptr, sc_ptr, xg_ptr, y_ptr, M,
                          K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_W: tl.constexpr, XCH: tl.constexpr, NPROG: tl.constexpr, STAGES: tl.constexpr,
                          SYM: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr):
        """y[tok, rows] for the row blocks pid, pid + NPROG, ...: mode 6 (see quantune.kernels._gemv_kernel) over
        tiles of BLOCK_M rows x BLOCK_W words, tiles spanning several groups (GROUP < BLOCK_W words' columns)."""
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = K // PER
        WPG: tl.constexpr = GROUP // PER
        CPB: tl.constexpr = 8 // BITS
        NK: tl.constexpr = NW // BLOCK_W
        GPT: tl.constexpr = BLOCK_W // WPG
        pid = tl.program_id(0)
        tok = tl.program_id(1)
        blocks = tl.cdiv(M, BLOCK_M)
        total = ((blocks - pid + NPROG - 1) // NPROG) * NK
        accg = tl.zeros([BLOCK_M, GPT], dtype=tl.float32)
        if PDL:
            _gdc_wait()
        for it in tl.range(0, total, num_stages=STAGES):
            blk = pid + (it // NK) * NPROG
            kk = it % NK
            w0 = kk * BLOCK_W
            r0 = blk * BLOCK_M
            word = w_desc.load([r0, w0])
            scale = s_desc.load([r0, kk * GPT]).to(tl.float32)
            if SYM:
                offset = scale * -(1 << (BITS - 1))
            else:
                offset = o_desc.load([r0, kk * GPT]).to(tl.float32)
            # the input's pairs and group sums as 1-D loads (one copy a tile, broadcast along the rows in registers)
            i0, i1, i2, i3, i4, i5, i6, i7 = _pairs8(xp_ptr, tok, CPB, NW, (w0 + tl.arange(0, BLOCK_W))[None, :])
            xscale = tl.load(sc_ptr + tok * ((K + XCH - 1) // XCH) + (w0 * PER) // XCH)
            xg = tl.load(xg_ptr + tok * (K // GROUP) + kk * GPT + tl.arange(0, GPT))[None, :]
            dot = _mode6_dot(word, i0, i1, i2, i3, i4, i5, i6, i7, CPB, BITS, ASM)
            accg += (scale * xscale) * tl.sum(tl.reshape(dot, (BLOCK_M, GPT, WPG)), axis=2).to(tl.float32) \
                + offset * xg
            if kk == NK - 1:
                rows = r0 + tl.arange(0, BLOCK_M)
                tl.store(y_ptr + tok * M + rows, tl.sum(accg, axis=1), mask=rows < M)
                accg = tl.zeros([BLOCK_M, GPT], dtype=tl.float32)


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def tma_gemv(x: torch.Tensor, codes: torch.Tensor, form, bits: int, tables: tuple, prepared: tuple,
             block_m: int, block_w: int, warps: int, stages: int, per_sm: int) -> torch.Tensor:
    """x W^T (T, out) float32 through _gemv6_tma_kernel, on ``prepared`` (kernels.prepared_input, pairs "chunk")."""
    (t, k), m = x.shape, codes.shape[0]
    per = 32 // bits
    nw = k // per
    wpg = form.group // per
    if block_w % wpg or nw % block_w or kernels.rounding_columns(k, bits) % (block_w * per):
        raise ValueError(f"tile of {block_w} words does not fit groups of {wpg} words / rows of {nw}")
    w = codes.view(torch.int32)
    a, bx, sym = kernels.affine_args(tables)
    gpt = block_w // wpg
    w_desc = TensorDescriptor(w, shape=[m, nw], strides=[nw, 1], block_shape=[block_m, block_w])
    s_desc = TensorDescriptor(a, shape=list(a.shape), strides=list(a.stride()), block_shape=[block_m, gpt])
    o_desc = TensorDescriptor(bx, shape=list(bx.shape), strides=list(bx.stride()), block_shape=[block_m, gpt])
    xd, xqd, xs, xqs, xp, xqp, sc, qsc, xg = prepared
    if xg is None:
        raise ValueError("the probe serves groups shorter than a chunk (xg present)")
    y = torch.empty(t, m, device=x.device, dtype=torch.float32)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    nprog = min(sms * per_sm, -(-m // block_m))
    pdl = kernels.pdl_enabled(x)
    asm = x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    xch = kernels.rounding_columns(k, bits)
    _gemv6_tma_kernel[(nprog, t)](w_desc, s_desc, o_desc, xp, sc, xg, y, m, K=k, GROUP=form.group, BITS=bits,
                                  BLOCK_M=block_m, BLOCK_W=block_w, XCH=xch, NPROG=nprog,
                                  STAGES=stages, SYM=sym, PDL=pdl, ASM=asm, num_warps=warps,
                                  **({"launch_pdl": True} if pdl else {}))
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--configs", default="16x4x64x4x2,32x4x64x4x1,16x2x64x4x2,8x1x64x4x4,32x4x64x6x1,16x4x128x3x2",
                   help="rows x warps x words x stages x programs per SM")
    args = p.parse_args()
    from eval import bench_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kernels.DEV = dev
    if dev == "cuda":
        triton.set_allocator(_alloc)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if dev == "cuda" else [(2048, 40)]
    configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
    if dev != "cuda":
        configs = [(16, 1, 64, 2, 1), (8, 2, 64, 3, 1)]
    bench = bench_kernels.bench
    rotating = bench_kernels.rotating
    out = []
    for case in bench_kernels.rtn_cases(shapes, args.methods, 64):
        k, n, x, spec, bits, copies, t_bf16 = case.k, case.n, case.x, case.spec, case.bits, case.copies, case.bf16_s
        form = case.form
        prep = kernels.prepared_input(x, form, bits, pairs="chunk", share=False)
        bm0, nw0, bw0 = kernels.gemv_tile(n, True, k, bits)
        split0 = kernels.gemv_split(n, form, bits, bm0, bw0)
        unroll0 = kernels.gemv_unroll((bm0, nw0, bw0), True, bits, k, n)

        def lib(layer, prepared=prep):
            return kernels.gemv_matmul(x, layer[0], layer[1], bits, block_m=bm0, block_w=bw0, num_warps=nw0,
                                       split=split0, tables=layer[2], prepared=prepared,
                                       unroll=unroll0)
        want = lib(copies[0])
        t_lib = bench(rotating([lambda c=c: lib(c) for c in copies])) if dev == "cuda" else None

        whole_lib = bench_kernels.library_call(x, bits)
        t_whole_lib = bench(rotating([lambda c=c: whole_lib(c) for c in copies])) if dev == "cuda" else None
        base = dict(k=k, n=n, method=spec, bf16_us=t_bf16 and t_bf16 * 1e6, library_kernel_us=t_lib and t_lib * 1e6,
                    library_whole_us=t_whole_lib and t_whole_lib * 1e6, library_tile=[bm0, nw0, bw0, unroll0])
        print("library", json.dumps(base), flush=True)
        for bm, nw, bw, st, per_sm in configs:
            def call(layer, prepared=prep):
                return tma_gemv(x, layer[0], layer[1], bits, layer[2], prepared, bm, bw, nw, st, per_sm)

            def whole(layer):
                kernels._PREPARED.clear()
                prepared = kernels.prepared_input(x, layer[1], bits, pairs="chunk", share=False,
                                                  trigger=kernels.pdl_enabled(x))
                return call(layer, prepared).to(x.dtype)
            try:
                got = call(copies[0])
                t = bench(rotating([lambda c=c: call(c) for c in copies])) if dev == "cuda" else None
                tw = bench(rotating([lambda c=c: whole(c) for c in copies])) if dev == "cuda" else None
                gw = whole(copies[0])
            except Exception as exc:  # a config that does not compile here
                print(f"{spec} {k}x{n} {bm}x{nw}x{bw}x{st}x{per_sm}: {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            err = float((got - want).norm() / want.norm())
            errw = float((gw.float() - want).norm() / want.norm())
            row = dict(base, config=[bm, nw, bw, st, per_sm], kernel_us=t and t * 1e6, whole_us=tw and tw * 1e6,
                       whole_x_bf16=t_bf16 / tw if tw else None, library_whole_x_bf16=t_bf16 / t_whole_lib
                       if t_whole_lib else None, equal=bool(torch.equal(got, want)), rel_diff=err,
                       whole_rel_diff=errw)
            print(json.dumps(row), flush=True)
            out.append(row)
            if err > 1e-5:
                raise SystemExit(f"{spec} {k}x{n} {bm}x{nw}x{bw}: output differs from the library's ({err:.2e})")
    bench_kernels.save_sweep(out, "probe_tma_gemv", ("k", "n", "method"), "whole_us")


if __name__ == "__main__":
    main()
