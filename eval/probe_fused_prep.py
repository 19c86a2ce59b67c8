"""Probe: rtn's few-token GEMV (mode 6) preparing its own 16-bit input, once, inside the same launch.
quantune's rtn call is two launches: a small preparation kernel (the input rounded to 16 bits per chunk, its scales,
word and group sums: quantune.kernels._prep_kernel) and the GEMV, which loads its first codes early (programmatic
dependent launch) and then waits for the preparation's whole grid to finish. That chain costs about 1 us of a
5-12 us call (eval/results/notes.md, fifteenth session). The sixteenth session's probe_round_gemv removed it by
rounding the input per tile in every program: 1.5-3x slower (the rounding repeated by every row block).

Here the first P programs of the GEMV's own grid (P = tokens x pieces of the input) each prepare one piece of the input
exactly as the preparation kernel does (same values, same layout), publish it with a release increment of a counter, and
every program waits on that counter (acquire loads, a short sleep between polls) before it reads the input: one launch,
the work done once, the grid's completion replaced by a counter. The last program to finish resets the counter (so the
launch is re-playable in a CUDA graph). Under the interpreter, which runs the programs one after another, the first
program prepares every piece instead (no waiting): the CPU check covers the pieces' values, the GPU run the
synchronisation. It relies on programs with low linear index being resident before later ones spin (the hardware
dispatches blocks in order); a program that prepares never waits before publishing, so the wait cannot deadlock once the
first P programs run.

Per case (the library's tile for the shape), cold L2 and in CUDA graphs: the library's whole call
(fused_matmul), this kernel without fusion after the library's preparation (the same loop: shows that the probe's
loop is the library's), and with fusion, for each piece size; outputs checked equal to the library's. Writes
$OUT/probe_fused_prep.json. On the CPU (TRITON_INTERPRET=1, programs run in order) it checks the outputs on small
shapes and times nothing. ``--sass`` compiles the fused kernel for sm_90 here (no GPU) and prints its size.

Measured on the H200 (eval/results/notes.md, sixteenth session): about 2x slower than the library's two launches on
every case, and off the library's output on 8192x28672 (more programs than are resident): not adopted."""
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
    from quantune.kernels import _gdc_wait, _mode6_dot, _mode6_tile, _store_pairs

    @triton.jit
    def _poll(ctr_ptr, ASM: tl.constexpr):
        """The counter, read with acquire semantics at GPU scope (an atomic read in the interpreter)."""
        if ASM:
            v = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ctr_ptr],
                                          dtype=tl.int32, is_pure=False, pack=1)
        else:
            v = tl.atomic_add(ctr_ptr, 0)
        return v

    @triton.jit
    def _nap(ASM: tl.constexpr, NS: tl.constexpr):
        if ASM:
            if NS > 0:
                tl.inline_asm_elementwise(f"nanosleep.u32 {NS}; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                                          pack=1)

    @triton.jit
    def _prep_piece(x_ptr, xs_ptr, xp16_ptr, sc_ptr, xg_ptr, tok, piece, K: tl.constexpr, PER: tl.constexpr,
                    CH: tl.constexpr, SCH: tl.constexpr, GS: tl.constexpr):
        """Columns ``piece * CH ...`` of token ``tok``'s input prepared as _prep_kernel does for mode 6 (PAIRS 2,
        no float32 copy): 16-bit pairs with the SCH-column chunk's scale, the rounded input's word sums and, with
        GS > 0, its GS-column sums; the chunk's first piece stores the scale."""
        c = piece * CH + tl.arange(0, CH)
        m = c < K
        xv = tl.load(x_ptr + tok * K + c, mask=m, other=0.0).to(tl.float32)
        SUB: tl.constexpr = SCH // CH
        cs = (piece // SUB) * SCH + tl.arange(0, SCH)
        amax = tl.max(tl.abs(tl.load(x_ptr + tok * K + cs, mask=cs < K, other=0.0).to(tl.float32)), axis=0)
        nch = (K + SCH - 1) // SCH
        scale = tl.maximum(amax, 1e-30) / 32767.0
        tl.store(sc_ptr + tok * nch + piece // SUB, scale, mask=piece % SUB == 0)
        _store_pairs(xp16_ptr, tok, xv, scale, c, m, PER, K // PER, 8 // (32 // PER))
        qf = xv / scale
        rounded = tl.where(qf >= 0, qf + 0.5, qf - 0.5).to(tl.int32).to(tl.float32) * scale
        xv = tl.where(xv == xv, rounded, xv)
        wl = piece * (CH // PER) + tl.arange(0, CH // PER)
        tl.store(xs_ptr + tok * (K // PER) + wl, tl.sum(tl.reshape(xv, (CH // PER, PER)), axis=1),
                 mask=wl < K // PER)
        if GS > 0:
            gl = piece * (CH // GS) + tl.arange(0, CH // GS)
            tl.store(xg_ptr + tok * (K // GS) + gl, tl.sum(tl.reshape(xv, (CH // GS, GS)), axis=1), mask=gl < K // GS)

    @triton.jit
    def _gemv6_fused_kernel(w_ptr, x_ptr, ctr_ptr, xs_ptr, xp_ptr, sc_ptr, xg_ptr, a_ptr, bx_ptr, y_ptr, M, stride_w,
                            groups, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_W: tl.constexpr, XCH: tl.constexpr, CH: tl.constexpr, GS: tl.constexpr,
                            SUMG: tl.constexpr, SYM: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
                            FUSE: tl.constexpr, NS: tl.constexpr, EVICT: tl.constexpr = "evict_first",
                            UNROLL: tl.constexpr = 1):
        """quantune.kernels._gemv_kernel's mode 6 (SPLIT 1, no prefetch, one output); FUSE: the input prepared by
        the grid's first programs (see the module's docstring), else read as the library's preparation left it."""
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = K // PER
        WPG: tl.constexpr = GROUP // PER
        CPB: tl.constexpr = 8 // BITS
        SWPG: tl.constexpr = (SUMG if SUMG > 0 else GROUP) // PER
        GPT: tl.constexpr = BLOCK_W // SWPG if SWPG < BLOCK_W else 1
        NPIECE: tl.constexpr = (K + CH - 1) // CH
        pid_m = tl.program_id(0)
        tok = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        wcols = tl.arange(0, BLOCK_W)
        wtile = tl.broadcast_to(wcols[None, :], (BLOCK_M, BLOCK_W))
        acc = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
        accg = tl.zeros([BLOCK_M, GPT], dtype=tl.float32)
        for i in tl.range(0, NW, BLOCK_W, loop_unroll_factor=UNROLL):
            word = tl.load(w_ptr + rows[:, None] * stride_w + i + wtile, mask=rmask[:, None], other=0,
                           eviction_policy=EVICT)
            if i == 0:  # the first words are on their way
                if PDL:
                    _gdc_wait()
                if FUSE:
                    lid = tok * tl.num_programs(0) + pid_m
                    total = tl.num_programs(1) * NPIECE
                    if ASM:
                        if lid < total:
                            _prep_piece(x_ptr, xs_ptr, xp_ptr.to(tl.pointer_type(tl.int16)), sc_ptr, xg_ptr,
                                        lid // NPIECE, lid % NPIECE, K, PER, CH, XCH, GS)
                            tl.debug_barrier()  # the program's stores before its release
                            tl.atomic_add(ctr_ptr, 1, sem="release")
                        n = _poll(ctr_ptr, ASM)
                        while n < total:
                            _nap(ASM, NS)
                            n = _poll(ctr_ptr, ASM)
                    elif lid == 0:  # the interpreter runs the programs one after another: the first prepares all
                        for pc in range(0, total):
                            _prep_piece(x_ptr, xs_ptr, xp_ptr.to(tl.pointer_type(tl.int16)), sc_ptr, xg_ptr,
                                        pc // NPIECE, pc % NPIECE, K, PER, CH, XCH, GS)
            i0, i1, i2, i3, i4, i5, i6, i7, sx, off = _mode6_tile(
                xp_ptr, sc_ptr, xs_ptr, xg_ptr, a_ptr, bx_ptr, tok, rows, rmask, i, wtile, groups,
                K, NW, CPB, PER, XCH, WPG, BLOCK_M, BLOCK_W, GPT, GROUP, SYM, BITS, SWPG)
            dot = _mode6_dot(word, i0, i1, i2, i3, i4, i5, i6, i7, CPB, BITS, ASM)
            if SWPG >= BLOCK_W:
                acc += sx * dot.to(tl.float32) + off
            else:
                accg += sx * tl.sum(tl.reshape(dot, (BLOCK_M, GPT, SWPG)), axis=2).to(tl.float32) + off
        if SWPG < BLOCK_W:
            out = tl.sum(accg, axis=1)
        else:
            out = tl.sum(acc, axis=1)
        tl.store(y_ptr + tok * M + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)
        if FUSE:  # the last program out resets the counter for the next launch
            done = tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel")
            if done == tl.num_programs(0) * tl.num_programs(1) - 1:
                tl.atomic_xchg(ctr_ptr, 0)
                tl.atomic_xchg(ctr_ptr + 1, 0)


class Fused:
    """One layer's fused call: the library's tile and buffers, the probe's kernel."""

    def __init__(self, x: torch.Tensor, codes: torch.Tensor, form, bits: int, tables: tuple, piece: int,
                 fuse: bool, sleep_ns: int = 64):
        (t, k), m = x.shape, codes.shape[0]
        affine = tables[2]
        tile = kernels.gemv_tile(m, affine, k, bits, form.group)
        self.block_m, self.warps, block_w = tile
        self.unroll = kernels.gemv_unroll(tile, affine, bits, k, m, form.group)
        span = kernels.gemv_span(m, affine, bits, k, form.group)
        self.xch = kernels.rounding_columns(k, bits)
        self.block_w = min(block_w, (2 if span else 1) * self.xch // (32 // bits))
        if kernels.gemv_split(m, form, bits, self.block_m, self.block_w) != 1:
            raise ValueError("the probe serves layers the library does not split along K")
        kernels._PREPARED.clear()
        _, _, xs, _, xp, _, sc, _, xg = kernels.prepared_input(x, form, bits, pairs="chunk", share=False)
        self.sumg = k // xg.shape[1] if xg is not None and form.group >= k else 0
        self.gs = 0 if xg is None else k // xg.shape[1]
        if fuse:  # own buffers, written by the kernel
            xs, xp, sc = torch.empty_like(xs), torch.empty_like(xp), torch.empty_like(sc)
            xg = None if xg is None else torch.empty_like(xg)
        self.xs, self.xp, self.sc = xs, xp, sc
        self.xg = xs if xg is None else xg
        self.piece = min(piece, self.xch)
        if self.gs and self.piece % self.gs:
            self.piece = self.gs
        if fuse and t * triton.cdiv(k, self.piece) > t * triton.cdiv(m, self.block_m):
            raise ValueError("more pieces of input than programs: the waiting programs would never see them all")
        self.fuse, self.sleep_ns = fuse, sleep_ns
        self.ctr = torch.zeros(2, device=x.device, dtype=torch.int32)
        self.codes, self.form, self.bits, self.tables = codes, form, bits, tables

    def __call__(self, x: torch.Tensor, codes=None, form=None, tables=None) -> torch.Tensor:
        if codes is None:
            codes, form, tables = self.codes, self.form, self.tables
        (t, k), m = x.shape, codes.shape[0]
        xs, xp, sc, xg = self.xs, self.xp, self.sc, self.xg
        if not self.fuse:  # the library's preparation, launched as before the library's GEMV
            _, _, xs, _, xp, _, sc, _, g = kernels.prepared_input(x, form, self.bits, pairs="chunk",
                                                                   trigger=kernels.pdl_enabled(x), share=False)
            xg = xs if g is None else g
        a, bx, sym = kernels.affine_args(tables)
        w = codes.view(torch.int32)
        y = torch.empty(t, m, device=x.device, dtype=x.dtype)
        pdl = kernels.pdl_enabled(x)
        asm = x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
        _gemv6_fused_kernel[(triton.cdiv(m, self.block_m), t)](
            w, x, self.ctr, xs, xp, sc, xg, a, bx, y, m, w.stride(0), form.bx.shape[1],
            K=k, GROUP=form.group, BITS=self.bits, BLOCK_M=self.block_m, BLOCK_W=self.block_w, XCH=self.xch,
            CH=self.piece, GS=self.gs, SUMG=self.sumg, SYM=sym, ASM=asm, PDL=pdl, FUSE=self.fuse, NS=self.sleep_ns,
            UNROLL=self.unroll, num_warps=self.warps, **({"launch_pdl": True} if pdl else {}))
        return y


def sass_report(bits: int, group: int, k: int, block_m: int, block_w: int, warps: int, piece: int) -> dict:
    """The fused kernel compiled for sm_90 with and without fusion: registers and instructions."""
    from eval.sass_gemv import compile_gemv

    out = {}
    for fuse in (False, True):
        out["fused" if fuse else "plain"] = compile_gemv(
            {"K": k, "GROUP": group, "BITS": bits, "BLOCK_M": block_m, "BLOCK_W": block_w, "XCH": 1024, "CH": piece,
             "GS": group if group < k else 0, "SUMG": 0, "SYM": False, "ASM": True, "PDL": True, "FUSE": fuse,
             "NS": 64}, num_warps=warps, kernel=_gemv6_fused_kernel, sass=("IDP", "LDG", "BAR", "NANOSLEEP"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--pieces", default="256,512,1024", help="columns each preparing program prepares")
    p.add_argument("--sleep", default="64", help="nanoseconds between polls (comma-separated to sweep)")
    p.add_argument("--group", default="64", help="rtn's group size, or 'row'")
    p.add_argument("--variants", default="plain,fused", help="plain (the probe's loop after the library's "
                   "preparation), fused")
    p.add_argument("--sass", action="store_true", help="compile for sm_90 here (no GPU) and print the sizes")
    args = p.parse_args()
    group = parse_group(args.group, "--group")
    pieces = [int(v) for v in args.pieces.split(",")]
    sleeps = [int(v) for v in args.sleep.split(",")]
    if args.sass:
        for spec in args.methods.split(","):
            bits = int(spec.split("-")[1])
            k = int(args.shapes.split(",")[0].split("x")[0])
            rep = sass_report(bits, group or k, k, 4, 64, 1, pieces[0])
            print(json.dumps({"method": spec, "k": k, **{
                name: {key: r[key] for key in ("registers", "stack", "sass_instructions", "sass_count")}
                for name, r in rep.items()}}))
        return
    from eval import bench_kernels

    dev = bench_kernels.probe_device()
    if dev != "cuda":
        kernels.GEMV_MIN_PROGRAMS = 1  # small layers unsplit, as the probe needs
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if dev == "cuda" else [(512, 24)]
    bench, rotating = bench_kernels.bench, bench_kernels.rotating
    out = []
    for case in bench_kernels.rtn_cases(shapes, args.methods, group, tokens=1 if dev == "cuda" else 2):
        k, n, x, spec, bits, copies, t_bf16 = case.k, case.n, case.x, case.spec, case.bits, case.copies, case.bf16_s
        whole_lib = bench_kernels.library_call(x, bits)
        want = whole_lib(copies[0]).float()
        t_lib = bench(rotating([lambda c=c: whole_lib(c) for c in copies])) if dev == "cuda" else None
        base = dict(k=k, n=n, method=spec, group=args.group, bf16_us=t_bf16 and t_bf16 * 1e6,
                    library_whole_us=t_lib and t_lib * 1e6, library_x_bf16=t_bf16 / t_lib if t_lib else None)
        wanted = args.variants.split(",")
        variants = [("plain", 0, 0)] * ("plain" in wanted) + [
            ("fused", pc, ns) for pc in pieces for ns in sleeps if "fused" in wanted]
        for name, pc, ns in variants:
            try:
                call = Fused(x, copies[0][0], copies[0][1], bits, copies[0][2], pc or 1024, name == "fused", ns)
                got = torch.stack([call(x).float() for _ in range(3)])  # the counter resets between launches
                t = bench(rotating([lambda c=c: call(x, *c) for c in copies])) if dev == "cuda" else None
                again = call(x).float()
            except Exception as exc:  # a config that does not compile or fit here
                print(f"{spec} {k}x{n} {name} {pc}: {type(exc).__name__}: {exc}"[:400], flush=True)
                continue
            diff = float(max((g - want).abs().max() for g in [*got, again]) / want.abs().max())
            row = dict(base, variant=name, piece=call.piece if name == "fused" else None, sleep_ns=ns,
                       tile=[call.block_m, call.warps, call.block_w, call.unroll], whole_us=t and t * 1e6,
                       whole_x_bf16=t_bf16 / t if t else None, max_diff_vs_library=diff,
                       counter_after=call.ctr.tolist())
            print(json.dumps(row), flush=True)
            out.append(row)
            if diff > 1e-6 or any(call.ctr.tolist()):
                raise SystemExit(f"{spec} {k}x{n} {name} {pc}: output off the library's ({diff:.2e}) "
                                 f"or counter not reset ({call.ctr.tolist()})")
    bench_kernels.save_sweep(out, "probe_fused_prep", ("k", "n", "method"), "whole_us")


if __name__ == "__main__":
    main()
