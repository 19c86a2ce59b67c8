"""Triton kernels for quantized linear layers on the GPU: a few-token GEMV that never builds a
weight, and a decode of the factors to bf16 for prefill.

Both formats decode linearly in the bits of their codes (:class:`quantune.methods.BitplaneForm`),
so ``y = x W^T`` is, per output row, ``bits`` dot products of 0/1 bit planes with ``x`` (or with
``xq = Q^T x`` per group, for kashin's transformed factor) combined with per-group coefficients.

- :func:`gemv_matmul` (up to ``MAX_TOKENS`` tokens; 2, 4 and 8-bit codes): codes read as 32-bit
  words, decoded in registers (:data:`GEMV_MODES`: rtn's whole codes and kashin's bit planes as int16
  ``dp2a`` dot products with the input rounded to 16 bits), inputs prepared once per input tensor by
  :func:`prepared_input` (cast, de-interleave, rounding, kashin's input transform).
- :func:`decode_bf16` + :func:`prefill_matmul` (more tokens): the factors decoded to bf16 at
  memory speed, then cuBLAS (one GEMM for rtn, two for kashin: ``x U^T + (x Q) V^T``, ``x Q`` by
  :func:`prefill_transformed_input`: two Triton passes around one batched rfft); kashin in groups of
  16-128 columns: the whole weight ``U + V Q^T`` by :func:`decode_joined_bf16`, then one GEMM.
- :func:`bitplane_matmul` / :func:`levels_matmul`: earlier byte-reading kernels for code widths
  that straddle words (3, 5, 6, 7 bits).

:func:`bitplane_matmul_reference` is the same math in plain torch (CPU, tests). Every kernel runs
on CUDA or, for correctness checks, on the CPU under ``TRITON_INTERPRET=1``; timing lives in
``eval/bench_kernels.py``. :class:`~quantune.qlinear.QuantLinear` picks the path by device and
token count (``_kernel_path``). Every kernel goes through :func:`quantune.launch.launch`: Triton's
launch path the first time, the compiled kernel's launcher directly on repeats (host time for eager
decoding).
"""
from __future__ import annotations

import functools
import os

import torch

from quantune.launch import launch
from quantune.methods import BitplaneForm
from quantune.transforms import dct_twiddle, forward_transform, hadamard_block_size, random_signs

MAX_TOKENS = 16


def transformed_input(x: torch.Tensor, form: BitplaneForm) -> torch.Tensor:
    """``xq``: ``Q^T`` applied to every ``group``-long segment of the rows of ``x`` ``(T, K)``."""
    if form.transform is None:
        return x
    t, k = x.shape
    return forward_transform(x.float().reshape(t, k // form.group, form.group), form.transform,
                             form.seed).reshape(t, k)


def bit_planes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``(bits, out, n)`` 0/1 float planes of packed codes ``(out, bytes)``."""
    from quantune.bitpack import unpack_codes

    codes = unpack_codes(packed, bits, n).long()
    return torch.stack([((codes >> t) & 1).float() for t in range(bits)])


def bitplane_matmul_reference(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int) -> torch.Tensor:
    """``x W^T`` ``(T, out)`` through the bit-plane form, in float32 torch."""
    x = x.float()
    t, k = x.shape
    a, bx, bq = form.planes()
    m, groups = bx.shape
    xq = transformed_input(x, form).float()
    planes = bit_planes(packed, bits, k).reshape(bits, m, groups, form.group)
    xg, xqg = x.reshape(t, groups, form.group), xq.reshape(t, groups, form.group)
    y = torch.einsum("mg,tg->tm", bx, xg.sum(-1)) + torch.einsum("mg,tg->tm", bq, xqg.sum(-1))
    for plane in range(bits):
        src = xg if plane < form.ku else xqg
        dots = torch.einsum("mgk,tgk->tmg", planes[plane], src)
        y = y + (dots * a[..., plane]).sum(-1)
    return y


def level_tables(form: BitplaneForm, bits: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per (row, group): the values each factor's code field decodes to.

    ``lut_u[r, g, j] = bx + sum_{t < ku} a_t bit_t(j)`` (``2**ku`` entries) and likewise
    ``lut_v`` over the high ``bits - ku`` bits with ``bq``. When every ``a_t = a_0 2^t`` (rtn's
    uniform grid) the u value is affine in the code and no table is needed: returns
    ``(bx, a_0, True)`` instead (offset and scale per (row, group)), with ``bx`` None where
    ``bx = -2^(bits-1) a_0`` (rtn's symmetric grid: the kernels derive the offset from the scale),
    and both in float16 where float16 holds them exactly (rtn's scales and minima are stored in
    float16): the kernels then read as many coefficient bytes as the format stores, not the four
    times as many of float32 offsets and scales."""
    a, bx, bq = form.planes()
    a = a.float()
    ku, kv = form.ku, bits - form.ku
    powers = 2.0 ** torch.arange(ku, device=a.device)
    if kv == 0 and torch.allclose(a[..., :ku], a[..., :1] * powers, rtol=1e-6, atol=0):
        scale, offset = a[..., 0].contiguous(), bx.float().contiguous()
        if torch.equal(offset, scale * -(1 << (bits - 1))):
            offset = None
        exact = [t for t in (scale, offset) if t is not None]
        if all(torch.equal(t.half().float(), t) for t in exact):
            scale, offset = (None if t is None else t.half() for t in (scale, offset))
        return offset, scale, True

    def table(coeffs, offset, k):
        j = torch.arange(1 << k, device=a.device)
        b = ((j[:, None] >> torch.arange(k, device=a.device)) & 1).float()  # (2^k, k)
        return (offset[..., None] + coeffs @ b.T).contiguous()

    lut_u = table(a[..., :ku], bx.float(), ku)
    lut_v = table(a[..., ku:], bq.float(), kv) if kv else torch.zeros_like(bq.float())[..., None]
    return lut_u, lut_v, False


def affine_args(tables: tuple) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """rtn's :func:`level_tables` as the kernels take them: (scales, offsets, SYM). The symmetric grid
    has no offset table (SYM: the kernels derive it); its scales then stand in for the unread pointer."""
    offset, scale = tables[0], tables[1]
    return scale, scale if offset is None else offset, offset is None


# kashin's word-reading kernels (the GEMV's mode 5, the planes decode, the joined decode) read the stored float16
# coefficients (BitplaneForm.c) instead of a float32 copy of a, bx and bq, when the layer's kernel form carries them
# (QuantLinear.kernel_form): 1.5 / 3.0 bits per weight less on the GPU at groups of 128 / 64, 0.19 per row. sm_90 code
# compiled here with Triton 3.6, loop instructions float32 planes -> float16: GEMV per row 276 -> 263 (two passes 208
# -> 205), 14336-long rows 527 -> 496, groups of 128 576 -> 535, of 64 585 -> 553, with group sums 384 -> 384; joined
# decode 4-bit 1302 -> 1170, 2-bit 1479 -> 1051; the planes decode (straight-line) 2911 -> 3011. Not yet timed on the
# H200: `bash eval/device_pending.sh half-coeffs`.
HALF_COEFFS = True


# ... except where a layer's GEMV runs in one pass (not LATE, see gemv_late) at 4 bits with one coefficient group a
# row: there the float32 planes measured faster. H200, whole call, cold L2, three repeats in one process
# (kernel_sweeps/session25/ab_kernels_half_row3.json), float16 c against the planes: kashin-4 8192x28672 69.4 us
# against 61.2, 4096x28672 39.4 against 34.5 (both one pass); the layers with two passes were level or faster on c
# (4096x4096 10.0 / 9.9, 4096x14336 21.4 / 21.0, 14336x4096 24.2 / 25.8, 11008x4096 25.9 / 25.2, 4096x11008 18.8 /
# 18.6), and kashin-2 faster on c everywhere but 14336x4096 (20.8 / 20.2). The cause is not known: moving the row's
# offsets (the only loads before the loop) after it changed nothing (69.1 against 68.8; half_fix). The planes
# cost 6 floats a row on the GPU (0.047 bits per weight at 4096 columns).
HALF_ONE_PASS_PLANES = True


def keeps_planes(form: BitplaneForm, bits: int, nbytes: int) -> bool:
    """Whether a kashin layer's kernel path takes the float32 planes although it stores float16 coefficients
    (:data:`HALF_ONE_PASS_PLANES`): 4-bit codes, one coefficient group a row, a GEMV in one pass over ``nbytes``
    of codes (the layer's, or those of the layers launched with it)."""
    return HALF_ONE_PASS_PLANES and bits == 4 and form.groups == 1 and not _late_rule(form, bits, nbytes)


def coef_args(form: BitplaneForm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """A kernel's three coefficient pointers and its HALF flag: the float16 ``c`` three times (HALF) where the
    form carries only that, else the float32 ``a``, ``bx``, ``bq``."""
    if form.a is None and form.c is not None:
        return form.c, form.c, form.c, True
    return (*form.planes(), False)


def plane_masks(form: BitplaneForm, bits: int) -> int:
    """The GEMV's PLANES for ``form`` (mode 5): 0 where no plane folds, else byte t the bits plane t reads, a run
    of doubling planes (``form.folds``) read by its first plane as one integer field, 0 for the planes folded."""
    return _plane_masks(form.folds, bits) if form.folds else 0


@functools.lru_cache(maxsize=None)
def _plane_masks(folds: int, bits: int) -> int:  # once per (folds, bits), not on every call
    masks = 0
    for t in range(bits):
        if folds >> t & 1:
            continue
        run = 1
        while t + run < bits and folds >> (t + run) & 1:
            run += 1
        masks |= ((1 << run) - 1) << t << (8 * t)
    return masks


def block_k_for(group: int) -> int | None:
    """The kernel's K tile: the largest power of two <= 256 dividing ``group`` (None below 16)."""
    block = group & (-group)
    block = min(block, 256)
    return block if block >= 16 else None


try:  # Triton is optional: CUDA machines have it; on the CPU it only serves interpreter tests
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _bitplane_kernel(codes_ptr, x_ptr, xq_ptr, a_ptr, bx_ptr, bq_ptr, y_ptr,
                         M, stride_codes, groups, group, K: tl.constexpr,
                         BITS: tl.constexpr, KU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        tok = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant (one build per layer width)
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + tok * K + cols).to(tl.float32)
            xq = tl.load(xq_ptr + tok * K + cols).to(tl.float32)
            g = k0 // group
            coef = rows * groups + g
            acc += tl.load(bx_ptr + coef, mask=rmask, other=0.0) * tl.sum(x, axis=0)
            acc += tl.load(bq_ptr + coef, mask=rmask, other=0.0) * tl.sum(xq, axis=0)
            if 8 % BITS == 0:  # 1, 2, 4, 8 bits: every code sits inside one byte, loaded once
                pos = cols * BITS
                byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (pos[None, :] >> 3),
                               mask=rmask[:, None], other=0)
                code = (byte >> (pos[None, :] & 7).to(tl.uint8)).to(tl.int32)
            for t in tl.static_range(BITS):
                if 8 % BITS == 0:
                    bit = ((code >> t) & 1).to(tl.float32)
                else:  # codes straddle bytes: fetch each bit where it lies
                    pos = cols * BITS + t
                    byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (pos[None, :] >> 3),
                                   mask=rmask[:, None], other=0)
                    bit = ((byte >> (pos[None, :] & 7).to(tl.uint8)) & 1).to(tl.float32)
                if t < KU:
                    dot = tl.sum(bit * x[None, :], axis=1)
                else:
                    dot = tl.sum(bit * xq[None, :], axis=1)
                acc += tl.load(a_ptr + coef * BITS + t, mask=rmask, other=0.0) * dot
        tl.store(y_ptr + tok * M + rows, acc, mask=rmask)

    @triton.jit
    def _levels_kernel(codes_ptr, x_ptr, xq_ptr, lu_ptr, lv_ptr, y_ptr,
                       M, stride_codes, groups, group, K: tl.constexpr,
                       BITS: tl.constexpr, KU: tl.constexpr, AFFINE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SYM: tl.constexpr = False):
        """Decode each weight's two factors through per-row level tables (a gather from a few
        cached bytes per row instead of BITS bit-plane products) and accumulate u x + v xq
        elementwise; one reduction per row at the end. AFFINE: u = lu + lv * code (rtn)."""
        pid_m = tl.program_id(0)
        tok = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + tok * K + cols).to(tl.float32)
            coef = rows * groups + k0 // group
            pos = cols * BITS
            if 8 % BITS == 0:
                byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (pos[None, :] >> 3),
                               mask=rmask[:, None], other=0)
                code = ((byte >> (pos[None, :] & 7).to(tl.uint8)) & ((1 << BITS) - 1)).to(tl.int32)
            else:
                code = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
                for t in tl.static_range(BITS):
                    p = pos + t
                    byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (p[None, :] >> 3),
                                   mask=rmask[:, None], other=0)
                    code |= (((byte >> (p[None, :] & 7).to(tl.uint8)) & 1).to(tl.int32) << t)
            if AFFINE:
                scale, offset = _affine(lv_ptr, lu_ptr, coef, rmask, SYM, BITS)
                u = offset[:, None] + scale[:, None] * code.to(tl.float32)
                acc += u * x[None, :]
            else:
                u = tl.load(lu_ptr + coef[:, None] * (1 << KU) + (code & ((1 << KU) - 1)),
                            mask=rmask[:, None], other=0.0)
                acc += u * x[None, :]
                if KU < BITS:
                    xq = tl.load(xq_ptr + tok * K + cols).to(tl.float32)
                    v = tl.load(lv_ptr + coef[:, None] * (1 << (BITS - KU)) + (code >> KU),
                                mask=rmask[:, None], other=0.0)
                    acc += v * xq[None, :]
        tl.store(y_ptr + tok * M + rows, tl.sum(acc, axis=1), mask=rmask)


    @triton.jit
    def _affine(a_ptr, bx_ptr, idx, mask, SYM: tl.constexpr, BITS: tl.constexpr):
        """rtn's (scale, offset) per (row, group) from :func:`level_tables` (float16 or float32) as
        float32; SYM (symmetric grid, no offsets stored): ``offset = -2^(BITS-1) scale``."""
        scale = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if SYM:
            offset = scale * -(1 << (BITS - 1))
        else:
            offset = tl.load(bx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        return scale, offset

    @triton.jit
    def _pick(t: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
        r = a0
        if t == 1:
            r = a1
        if t == 2:
            r = a2
        if t == 3:
            r = a3
        if t == 4:
            r = a4
        if t == 5:
            r = a5
        if t == 6:
            r = a6
        if t == 7:
            r = a7
        return r

    @triton.jit
    def _coef(ptr, idx, mask, stride: tl.constexpr, t: tl.constexpr, BITS: tl.constexpr):
        if t < BITS:
            return tl.load(ptr + idx * stride + t, mask=mask, other=0.0)
        else:
            return tl.zeros_like(idx).to(tl.float32)

    @triton.jit
    def _coefh(ptr, idx, mask, t: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr):
        """Plane t's coefficient ``a_t`` at (row, group) ``idx``: from ``form.a`` (float32), or with HALF from
        the stored float16 coefficients ``c`` (``a_t = 2 c_t``, exact)."""
        if HALF and t < BITS:
            return tl.load(ptr + idx * BITS + t, mask=mask, other=0.0).to(tl.float32) * 2.0
        else:
            return _coef(ptr, idx, mask, BITS, t, BITS)

    @triton.jit
    def _coefh8(ptr, idx, mask, BITS: tl.constexpr):
        """``a_t = 2 c_t`` for t = 0..7 from the float16 coefficients at ``idx`` (zeros past BITS)."""
        return (_coefh(ptr, idx, mask, 0, BITS, True), _coefh(ptr, idx, mask, 1, BITS, True),
                _coefh(ptr, idx, mask, 2, BITS, True), _coefh(ptr, idx, mask, 3, BITS, True),
                _coefh(ptr, idx, mask, 4, BITS, True), _coefh(ptr, idx, mask, 5, BITS, True),
                _coefh(ptr, idx, mask, 6, BITS, True), _coefh(ptr, idx, mask, 7, BITS, True))

    @triton.jit
    def _offset(ptr, b_ptr, idx, mask, T0: tl.constexpr, T1: tl.constexpr, BITS: tl.constexpr,
                HALF: tl.constexpr):
        """``bx`` (planes T0 = 0 to T1 = KU) or ``bq`` (KU to BITS) at ``idx``: loaded from ``b_ptr``, or with
        HALF ``-sum c_t`` over those planes of the float16 coefficients at ``ptr`` (as the form sums them)."""
        if HALF:
            s = tl.zeros_like(idx).to(tl.float32)
            for t in tl.static_range(T0, T1):
                s += tl.load(ptr + idx * BITS + t, mask=mask, other=0.0).to(tl.float32)
            return -s
        else:
            return tl.load(b_ptr + idx, mask=mask, other=0.0)

    @triton.jit
    def _zeros8(z):
        """Eight zero tensors like ``z`` (per-plane accumulators)."""
        return z, tl.zeros_like(z), tl.zeros_like(z), tl.zeros_like(z), tl.zeros_like(z), tl.zeros_like(z), \
            tl.zeros_like(z), tl.zeros_like(z)

    @triton.jit
    def _unscaled(d, t: tl.constexpr):
        """An integer plane sum gathered as ``2^t`` times its value, as that value in float32 (exact)."""
        return d.to(tl.float32) * (1.0 / (1 << t))

    @triton.jit
    def _set_plane(t: tl.constexpr, v, p0, p1, p2, p3, p4, p5, p6, p7):
        if t == 0:
            p0 = v
        if t == 1:
            p1 = v
        if t == 2:
            p2 = v
        if t == 3:
            p3 = v
        if t == 4:
            p4 = v
        if t == 5:
            p5 = v
        if t == 6:
            p6 = v
        if t == 7:
            p7 = v
        return p0, p1, p2, p3, p4, p5, p6, p7

    @triton.jit
    def _store_pairs(xp16_ptr, tok, vals, scale, c, m, PER: tl.constexpr, NW: tl.constexpr, CPB: tl.constexpr):
        """Columns ``c`` of a token's input ``vals`` rounded to 16 bits with ``scale`` (the token's
        ``max|x| / 32767``), stored as :func:`quantized_pairs` lays them out (int16 halves)."""
        qf = tl.minimum(tl.maximum(vals / scale, -32767.0), 32767.0)  # a bound-derived scale may round just past it
        qi = tl.where(qf >= 0, qf + 0.5, qf - 0.5).to(tl.int32).to(tl.int16)
        j = c % PER
        lane = j // CPB  # the byte of the bit-gathering register: pair 2h + half
        dest = (((tok * CPB + j % CPB) * 2 + lane // 2) * NW + c // PER) * 2 + lane % 2
        tl.store(xp16_ptr + dest, qi, mask=m)

    @triton.jit
    def _dp2a(a, b, c, HI: tl.constexpr, ASM: tl.constexpr):
        """PTX ``dp2a``: ``c + a.h0 * b.byte0 + a.h1 * b.byte1`` (``.byte2``/``.byte3`` with HI), ``a``
        two signed 16-bit halves, ``b`` four unsigned bytes; ASM=False computes the same with shifts
        and products (Triton's CPU interpreter runs no PTX)."""
        if ASM:
            if HI:
                r = tl.inline_asm_elementwise("dp2a.hi.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                              dtype=tl.int32, is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise("dp2a.lo.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                              dtype=tl.int32, is_pure=True, pack=1)
        else:
            lo = (a << 16) >> 16
            hi = a >> 16
            if HI:
                r = c + lo * ((b >> 16) & 0xFF) + hi * ((b >> 24) & 0xFF)
            else:
                r = c + lo * (b & 0xFF) + hi * ((b >> 8) & 0xFF)
        return r

    @triton.jit
    def _pairs8(ptr, tok, CPB: tl.constexpr, NW: tl.constexpr, offs):
        """The low and high halves of byte groups 0..3 (:func:`_pairs`), in that order."""
        return (_pairs(ptr, tok, 0, 0, CPB, NW, offs), _pairs(ptr, tok, 0, 1, CPB, NW, offs),
                _pairs(ptr, tok, 1, 0, CPB, NW, offs), _pairs(ptr, tok, 1, 1, CPB, NW, offs),
                _pairs(ptr, tok, 2, 0, CPB, NW, offs), _pairs(ptr, tok, 2, 1, CPB, NW, offs),
                _pairs(ptr, tok, 3, 0, CPB, NW, offs), _pairs(ptr, tok, 3, 1, CPB, NW, offs))

    @triton.jit
    def _gdc_wait():
        """PTX ``griddepcontrol.wait``: block until the previous kernel in the stream has finished and its
        writes are visible (a kernel launched with programmatic dependent launch runs ahead until here)."""
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _gdc_launch_dependents():
        """PTX ``griddepcontrol.launch_dependents``: the next kernel, if launched with programmatic
        dependent launch, may start now (it waits in :func:`_gdc_wait` for this one's results)."""
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _pdl_start(TRIGGER: tl.constexpr, WAIT: tl.constexpr):
        """A kernel's start under programmatic dependent launch: TRIGGER lets the next kernel (launched
        that way) start now; WAIT, for a kernel itself launched that way, blocks until the kernel before it
        has finished (before this one reads or writes memory)."""
        if TRIGGER:
            _gdc_launch_dependents()
        if WAIT:
            _gdc_wait()

    @triton.jit
    def _pairs(ptr, tok, k: tl.constexpr, h: tl.constexpr, CPB: tl.constexpr, NW: tl.constexpr, offs):
        """Packed int16 input pairs for byte group ``k``, half ``h`` (see :func:`quantized_pairs`)."""
        if k < CPB:
            r = tl.load(ptr + ((tok * CPB + k) * 2 + h) * NW + offs)
        else:
            r = tl.zeros_like(offs)
        return r

    @triton.jit
    def _mode6_tile(xp_ptr, sc_ptr, xs_ptr, xg_ptr, a_ptr, bx_ptr, tok, rows, rmask, w0, wtile, groups,
                    K: tl.constexpr, NW: tl.constexpr, CPB: tl.constexpr, PER: tl.constexpr, XCH: tl.constexpr,
                    WPG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, GPT: tl.constexpr,
                    GROUP: tl.constexpr, SYM: tl.constexpr, BITS: tl.constexpr, SWPG: tl.constexpr):
        """What GEMV mode 6 reads for the word tile at ``w0`` besides its codes: the input's 16-bit pairs
        (:func:`_pairs8`), ``scale * xscale`` and ``offset * xsum`` per (row, word) where the tile lies in one
        group, else per (row, group) (``xsum``: the input's word or group sums). A tile lies inside one
        XCH-column chunk of the input (one input scale) or covers two whole chunks (two scales, each word or
        group taking its half's: two loads a tile, no gather). SWPG: words per sum of the input (``xs`` per word
        where a sum's words, SWPG, cover the tile, else ``xg`` per SWPG words: a group, or a part of a group)."""
        offs = w0 + wtile
        p0, p1, p2, p3, p4, p5, p6, p7 = _pairs8(xp_ptr, tok, CPB, NW, offs)
        SPAN: tl.constexpr = BLOCK_W * PER > XCH
        tl.static_assert(XCH % (BLOCK_W * PER) == 0 or BLOCK_W * PER == 2 * XCH,
                         "mode 6 tiles lie inside one input chunk or cover two whole chunks")
        xsc = sc_ptr + tok * ((K + XCH - 1) // XCH) + (w0 * PER) // XCH
        xscale = tl.load(xsc)
        if SPAN:
            xscale2 = tl.load(xsc + 1)
        if SWPG >= BLOCK_W:  # one group: coefficients per row, broadcast along the words
            if SPAN:
                xscale = tl.where(wtile < BLOCK_W // 2, xscale, xscale2)
            scale, offset = _affine(a_ptr, bx_ptr, (rows * groups + w0 // WPG)[:, None], rmask[:, None], SYM, BITS)
            off = offset * tl.load(xs_ptr + tok * NW + offs)
        else:
            tl.static_assert(not SPAN or XCH % (SWPG * PER) == 0, "a group's integer sum has one input scale")
            gl = tl.broadcast_to(tl.arange(0, GPT)[None, :], (BLOCK_M, GPT))
            if SPAN:
                xscale = tl.where(gl < GPT // 2, xscale, xscale2)
            gcols = (w0 + gl * SWPG) // WPG  # the coefficients' group of each sum
            scale, offset = _affine(a_ptr, bx_ptr, rows[:, None] * groups + gcols, rmask[:, None], SYM, BITS)
            off = offset * tl.load(xg_ptr + tok * (K // (SWPG * PER)) + w0 // SWPG + gl)
        return p0, p1, p2, p3, p4, p5, p6, p7, scale * xscale, off

    @triton.jit
    def _mode6_dot(word, i0, i1, i2, i3, i4, i5, i6, i7, CPB: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
        """Mode 6's integer dot products of a word tile's codes with the input's 16-bit pairs ``i0..i7``
        (:func:`_mode6_tile`; broadcast to the tile's shape where given per word only): per word, ``(word >> k
        BITS) & mask`` puts four whole codes in a register's bytes and two ``dp2a`` multiply-add them."""
        dot = tl.zeros(word.shape, dtype=tl.int32)
        for k in tl.static_range(CPB):
            if BITS == 8:
                b = word
            else:
                b = (word >> (k * BITS)) & (((1 << BITS) - 1) * 0x01010101)
            lo = tl.broadcast_to(_pick(2 * k, i0, i1, i2, i3, i4, i5, i6, i7), word.shape)
            hi = tl.broadcast_to(_pick(2 * k + 1, i0, i1, i2, i3, i4, i5, i6, i7), word.shape)
            dot = _dp2a(lo, b, dot, False, ASM)
            dot = _dp2a(hi, b, dot, True, ASM)
        return dot

    @triton.jit
    def _gemv_kernel(w_ptr, xs_ptr, xqs_ptr, xp_ptr, xqp_ptr, sc_ptr, qsc_ptr, xg_ptr,
                     a_ptr, bx_ptr, bq_ptr, y_ptr, y1_ptr, y2_ptr, M, M1, M2, stride_w, groups,
                     K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, KU: tl.constexpr,
                     MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
                     ASM: tl.constexpr, XCH: tl.constexpr = 1024, PDL: tl.constexpr = False,
                     NOUT: tl.constexpr = 1, SYM: tl.constexpr = False, EVICT: tl.constexpr = "",
                     UNROLL: tl.constexpr = 1, LATE: tl.constexpr = False, SUMG: tl.constexpr = 0,
                     GSUM5: tl.constexpr = False, HALF: tl.constexpr = False, PLANES: tl.constexpr = 0,
                     HOLD: tl.constexpr = False):
        """Few-token GEMV over codes read as 32-bit words (PER = 32 / BITS codes a word, BITS 2, 4 or 8; vector
        loads), decoded with register arithmetic only: integer dot products of the codes with the input rounded
        to 16 bits, its pairs packed by code position (:func:`quantized_pairs`), and the input's sums per word
        (``xs[w] = sum_j x[w * PER + j]``, likewise ``xqs`` for the transformed input) or per group (``xg``)
        for the offsets. Every input load has the word tile's full shape, so it lands in the tile's register
        layout (a 1-D load would be moved through shared memory with a barrier). SPLIT programs share a row
        block along K (atomic adds into y = 0).

        MODE (how a word's codes meet the input; see GEMV_MODES; the float alternatives, modes 0 to 4, never
        faster, were removed in the twenty-seventh session):
        - 5, plane sums as integer dot products (kashin, 2/4/8 bits): the input rounded to 16 bits per
          token (``xp``: int16 pairs, ``sc``: the token's scale, :func:`quantized_pairs`); one shift and
          mask puts plane t's bits of four codes into the four bytes of a register, and two ``dp2a``
          multiply-add them with four inputs (about one instruction per weight and plane, against three).
        - 6, codes as integer dot products (rtn, 2/4/8 bits): the input rounded to 16 bits per XCH-column
          chunk (``sc``: one scale per token and chunk); ``(word >> k b) & 0x0F0F0F0F`` (4 bits) puts four
          whole codes in a register's bytes and two ``dp2a`` multiply-add them with four inputs: per word
          of 8 codes 2 LOP3, 1 shift and 4 ``dp2a``, then ``scale * xscale * dot + offset * xs`` per word
          when the tile lies in one group, else per group from the dots summed over the group's words
          and the group sums of x (``xg``), so the coefficients are never gathered per word.
        Coefficients: one per row when a tile lies inside one group, else gathered per word (mode 5 with GSUM5
        and groups of whole tiles' fractions: each plane's integer dots summed per group first, then one
        coefficient per (row, group) from a (BLOCK_M, groups in the tile) load, as mode 6 does).
        PLANES (mode 5): 0, plane t reads bit t of each code; else byte t of PLANES is the mask of the bits plane t
        reads (:func:`plane_masks`): a run of planes whose coefficients double from one to the next
        (``c_{t+1} = 2 c_t``, kashin's tied steps) is read as one integer field with the first one's coefficient,
        and a plane so folded into the one below has the byte 0 and is skipped.
        UNROLL: the K loop's unroll factor (Triton's loop_unroll_factor).
        LATE (mode 5, kashin): two passes over the codes, the planes below KU (``x``'s) first, then those from KU
        (``xq``'s), so the transformed input may arrive while the first pass runs. With PDL the first pass
        reads ``x``'s inputs without waiting: the caller guarantees that their kernel has finished when this
        one starts (:func:`_dct_stage2_kernel` with TRIGGER_LATE lets it start only after its own wait for the
        kernel that prepares ``x``); the wait comes before the second pass. The first pass's code loads keep
        the default L2 policy, so the second finds them there on layers that fit.
        HOLD (with LATE, rows of at most four word tiles): the first pass keeps the row block's words in registers
        (the K loop unrolled whole) and the second pass reads them there instead of from L2; the first pass's
        loads then leave L2 first (EVICT), as a one-pass call's do.
        EVICT: the codes' loads' L2 eviction policy ("" or "evict_first": each code is read once).
        PDL: launched with programmatic dependent launch (Hopper): the program loads its first words of
        codes, which no earlier kernel writes, while the input-preparation kernel before it still runs,
        and waits for that kernel (``griddepcontrol.wait``) before it reads anything else.
        NOUT > 1: the rows are those of NOUT layers stored back to back (q/k/v, gate/up): rows below M1 go
        to ``y_ptr`` (``(T, M1)``), rows from M1 to ``y1_ptr`` (``(T, M - M1)``, or ``(T, M2 - M1)`` with
        a third output from M2 to ``y2_ptr``): one launch for layers that read the same input.
        """
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = K // PER       # words per row
        WPG: tl.constexpr = GROUP // PER  # words per group
        CHUNK: tl.constexpr = NW // SPLIT
        pid_m = tl.program_id(0)
        if SPLIT > 1 or (MODE == 6 and BLOCK_W * PER > XCH):
            part = tl.program_id(1)
        else:  # a compile-time 0: the tiles' addresses are then the loop counter's, not part * CHUNK + i
            part = 0  # (mode 6's tiles over two input chunks ran slower so: kernel_sweeps/ab_kernels_part_tiles)
        tok = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        wcols = tl.arange(0, BLOCK_W)
        wtile = tl.broadcast_to(wcols[None, :], (BLOCK_M, BLOCK_W))  # word offsets in the tile's shape
        acc = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
        # mode 6: the input's sums per SUMG columns (xg) where given (SUMG < GROUP: parts of a group), else per group
        SWPG: tl.constexpr = (SUMG if SUMG > 0 else GROUP) // PER
        GPT: tl.constexpr = BLOCK_W // SWPG if SWPG < BLOCK_W else 1  # input sums per tile (mode 6)
        tl.static_assert(not LATE or (MODE == 5 and KU < BITS), "LATE: mode 5 with xq")
        tl.static_assert(not HALF or MODE == 5, "HALF (float16 coefficients): mode 5")
        NPHASE: tl.constexpr = 2 if LATE else 1
        NT: tl.constexpr = CHUNK // BLOCK_W  # word tiles a program reads
        tl.static_assert(not HOLD or (LATE and SPLIT == 1 and CHUNK % BLOCK_W == 0 and NT <= 4),
                         "HOLD: LATE over at most four whole word tiles, no K split")
        LOOP_UNROLL: tl.constexpr = NT if HOLD else UNROLL  # HOLD: the tile's index is a constant in each copy
        hw0, hw1, hw2, hw3 = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32), tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32), \
            tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32), tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32)  # HOLD's words
        accg = tl.zeros([BLOCK_M, GPT], dtype=tl.float32)           # mode 6 across groups: per (row, group)
        # mode 5 with GSUM5: groups shorter than the tile, each plane's dots summed per group before its coefficient
        G5: tl.constexpr = GSUM5 and MODE == 5 and WPG < BLOCK_W
        GPT5: tl.constexpr = BLOCK_W // WPG if G5 else 1
        tl.static_assert(not G5 or BLOCK_W % WPG == 0, "GSUM5: whole groups a tile")
        acc5 = tl.zeros([BLOCK_M, GPT5], dtype=tl.float32)
        gl5 = tl.broadcast_to(tl.arange(0, GPT5)[None, :], (BLOCK_M, GPT5))  # a tile's groups
        ONE_GROUP: tl.constexpr = WPG % CHUNK == 0  # this program's codes share one group's coefficients
        CPB: tl.constexpr = 8 // BITS  # codes per byte (modes 5 and 6)
        # mode 5 gathers plane t of byte group k as (word >> k BITS) & (0x01010101 << t): bytes of 0 or 2^t, one
        # LOP3 per plane and group after one shift per group, 2^t divided out with the coefficient; one shift per
        # (t, k) instead where a row's integer sums could pass 2^31 (very long rows at 8 bits)
        # (a byte is at most 2^(BITS-1) for one plane, below 2^BITS for a field of folded planes, see PLANES)
        SCALED: tl.constexpr = (not ONE_GROUP) or (CHUNK // BLOCK_W) * CPB * 4 * 32767 * (
            (1 << BITS) if PLANES else (1 << (BITS - 1))) < 2147483648
        # mode 5, ONE_GROUP: integer plane sums over K
        d0, d1, d2, d3, d4, d5, d6, d7 = _zeros8(tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32))
        if MODE == 5 and HALF and ONE_GROUP:  # the row's offsets, summed from c once (no kernel writes c)
            cidx1 = (rows * groups + (part * CHUNK) // WPG)[:, None]
            bx1 = _offset(a_ptr, bx_ptr, cidx1, rmask[:, None], 0, KU, BITS, HALF)
            bq1 = _offset(a_ptr, bq_ptr, cidx1, rmask[:, None], KU, BITS, BITS, HALF)
        # LATE (mode 5): x's planes (pass 0), then the wait, then xq's (pass 1); else one pass over all planes.
        # Whether a pass reads x (the planes below KU): (not LATE) or phase == 0; xq (the planes from KU):
        # KU < BITS and ((not LATE) or phase == 1), written out where used (constexprs cannot be reassigned)
        for phase in tl.static_range(NPHASE):
            if LATE and phase == 1:
                if PDL:
                    _gdc_wait()  # the transformed input's kernel (the last one before) has finished
            for i in tl.range(0, CHUNK, BLOCK_W, loop_unroll_factor=LOOP_UNROLL):
                w0 = part * CHUNK + i
                widx = w0 + wcols
                if HOLD and phase == 1:  # the first pass's words, kept in registers
                    word = tl.where(i == 0, hw0, tl.where(i == BLOCK_W, hw1, tl.where(i == 2 * BLOCK_W, hw2, hw3)))
                elif HOLD:  # the first pass: each tile's words kept for the second
                    word = tl.load(w_ptr + rows[:, None] * stride_w + w0 + wtile, mask=rmask[:, None], other=0,
                                   eviction_policy=EVICT)
                    hw0 = tl.where(i == 0, word, hw0)
                    if NT > 1:
                        hw1 = tl.where(i == BLOCK_W, word, hw1)
                    if NT > 2:
                        hw2 = tl.where(i == 2 * BLOCK_W, word, hw2)
                    if NT > 3:
                        hw3 = tl.where(i == 3 * BLOCK_W, word, hw3)
                elif LATE and phase == 0:  # read again by the second pass: left in L2
                    word = tl.load(w_ptr + rows[:, None] * stride_w + w0 + wtile, mask=rmask[:, None], other=0)
                else:
                    word = tl.load(w_ptr + rows[:, None] * stride_w + w0 + wtile, mask=rmask[:, None], other=0,
                                   eviction_policy=EVICT)
                    if PDL and not LATE:
                        if i == 0:  # the first words are on their way: now wait for the prepared input
                            _gdc_wait()
                if WPG >= BLOCK_W:  # the tile lies in one group: one coefficient per row
                    cidx = (rows * groups + w0 // WPG)[:, None]
                else:
                    cidx = rows[:, None] * groups + (widx // WPG)[None, :]
                cmask = rmask[:, None]
                if MODE == 5:
                    offs = w0 + wtile
                    if HALF and not ONE_GROUP and not G5:  # each word's c_t loaded once: a_t = 2 c_t, bx, bq
                        h0, h1, h2, h3, h4, h5, h6, h7 = _coefh8(a_ptr, cidx, cmask, BITS)
                        hx = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
                        hq = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
                        for t in tl.static_range(BITS):
                            if t < KU:
                                hx += _pick(t, h0, h1, h2, h3, h4, h5, h6, h7)
                            else:
                                hq += _pick(t, h0, h1, h2, h3, h4, h5, h6, h7)
                    if G5:
                        gidx5 = rows[:, None] * groups + w0 // WPG + gl5  # the tile's (row, group) coefficients
                    if (not LATE) or phase == 0:
                        xl0, xh0, xl1, xh1, xl2, xh2, xl3, xh3 = _pairs8(xp_ptr, tok, CPB, NW, offs)
                        xscale = tl.load(sc_ptr + tok)
                    if KU < BITS and ((not LATE) or phase == 1):
                        ql0, qh0, ql1, qh1, ql2, qh2, ql3, qh3 = _pairs8(xqp_ptr, tok, CPB, NW, offs)
                        qscale = tl.load(qsc_ptr + tok)
                    for t in tl.static_range(BITS):
                        pm = (PLANES >> (8 * t)) & 255 if PLANES else 1 << t  # the bits plane t reads (0: folded)
                        if pm and ((not LATE) or (phase == 0 and t < KU) or (phase == 1 and t >= KU)):
                            if ONE_GROUP:  # dp2a adds straight into the plane's running integer sum
                                dot = _pick(t, d0, d1, d2, d3, d4, d5, d6, d7)
                            else:
                                dot = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.int32)
                            for k in tl.static_range(CPB):
                                if SCALED:  # pm in every byte, as a signed 32-bit constant (0x80808080 at t = 7)
                                    b = (word >> (k * BITS)) & ((pm * 0x010101) | ((pm - (pm >> 7 << 8)) << 24))
                                else:
                                    b = (word >> (t + k * BITS)) & (((pm >> t) * 0x010101)
                                                                    | (((pm >> t) - ((pm >> t) >> 7 << 8)) << 24))
                                if t < KU:
                                    lo = _pick(k, xl0, xl1, xl2, xl3, xl0, xl0, xl0, xl0)
                                    hi = _pick(k, xh0, xh1, xh2, xh3, xh0, xh0, xh0, xh0)
                                else:
                                    lo = _pick(k, ql0, ql1, ql2, ql3, ql0, ql0, ql0, ql0)
                                    hi = _pick(k, qh0, qh1, qh2, qh3, qh0, qh0, qh0, qh0)
                                dot = _dp2a(lo, b, dot, False, ASM)
                                dot = _dp2a(hi, b, dot, True, ASM)
                            if ONE_GROUP:  # stay in integers until the end (|sum| < K * 32767 < 2^31)
                                d0, d1, d2, d3, d4, d5, d6, d7 = _set_plane(t, dot, d0, d1, d2, d3, d4, d5, d6, d7)
                            elif G5:  # per group: the words' dots summed, then one coefficient each
                                gdot = tl.sum(tl.reshape(dot, (BLOCK_M, GPT5, WPG)), axis=2).to(tl.float32)
                                gcoef = _coefh(a_ptr, gidx5, rmask[:, None], t, BITS, HALF)
                                acc5 += gcoef * (gdot * ((xscale if t < KU else qscale) / (1 << t)))
                            else:
                                if HALF:
                                    a_t = _pick(t, h0, h1, h2, h3, h4, h5, h6, h7)
                                else:
                                    a_t = _coef(a_ptr, cidx, cmask, BITS, t, BITS)
                                acc += a_t * (dot.to(tl.float32) * ((xscale if t < KU else qscale) / (1 << t)))
                    if G5:
                        if (not LATE) or phase == 0:
                            xsg = tl.sum(tl.reshape(tl.load(xs_ptr + tok * NW + offs), (BLOCK_M, GPT5, WPG)), axis=2)
                            acc5 += _offset(a_ptr, bx_ptr, gidx5, rmask[:, None], 0, KU, BITS, HALF) * xsg
                        if KU < BITS and ((not LATE) or phase == 1):
                            xqg = tl.sum(tl.reshape(tl.load(xqs_ptr + tok * NW + offs), (BLOCK_M, GPT5, WPG)), axis=2)
                            acc5 += _offset(a_ptr, bq_ptr, gidx5, rmask[:, None], KU, BITS, BITS, HALF) * xqg
                    else:
                        if HALF and ONE_GROUP:
                            bxt = bx1
                            bqt = bq1
                        elif HALF:  # -sum c_t = -sum a_t / 2
                            bxt = hx * -0.5
                            bqt = hq * -0.5
                        else:
                            bxt = _offset(a_ptr, bx_ptr, cidx, cmask, 0, KU, BITS, HALF)
                            bqt = _offset(a_ptr, bq_ptr, cidx, cmask, KU, BITS, BITS, HALF)
                        if (not LATE) or phase == 0:
                            acc += bxt * tl.load(xs_ptr + tok * NW + offs)
                        if KU < BITS and ((not LATE) or phase == 1):
                            acc += bqt * tl.load(xqs_ptr + tok * NW + offs)
                elif MODE == 6:
                    i0, i1, i2, i3, i4, i5, i6, i7, sx, off = _mode6_tile(
                        xp_ptr, sc_ptr, xs_ptr, xg_ptr, a_ptr, bx_ptr, tok, rows, rmask, w0, wtile, groups,
                        K, NW, CPB, PER, XCH, WPG, BLOCK_M, BLOCK_W, GPT, GROUP, SYM, BITS, SWPG)
                    dot = _mode6_dot(word, i0, i1, i2, i3, i4, i5, i6, i7, CPB, BITS, ASM)
                    if SWPG >= BLOCK_W:  # one group: coefficients per row, broadcast along the words
                        acc += sx * dot.to(tl.float32) + off
                    else:  # integer sums per group (or part) first, then one coefficient each (no per-word gather)
                        accg += sx * tl.sum(tl.reshape(dot, (BLOCK_M, GPT, SWPG)), axis=2).to(tl.float32) + off
        if MODE == 5:
            if ONE_GROUP:
                gidx = (rows * groups + (part * CHUNK) // WPG)[:, None]
                gmask = rmask[:, None]
                xscale = tl.load(sc_ptr + tok)
                qscale = tl.load(qsc_ptr + tok)
                if SCALED:  # plane t was gathered as 2^t times its value
                    d1 = _unscaled(d1, 1)
                    d2 = _unscaled(d2, 2)
                    d3 = _unscaled(d3, 3)
                    d4 = _unscaled(d4, 4)
                    d5 = _unscaled(d5, 5)
                    d6 = _unscaled(d6, 6)
                    d7 = _unscaled(d7, 7)
                accn = tl.zeros([BLOCK_M, 1], dtype=tl.float32)  # each plane summed along the row, then scaled once
                for t in tl.static_range(8):
                    if t < BITS and ((PLANES >> (8 * t)) & 255 if PLANES else 1):  # folded planes' sums stay 0
                        accn += _coefh(a_ptr, gidx, gmask, t, BITS, HALF) * (
                            tl.sum(_pick(t, d0, d1, d2, d3, d4, d5, d6, d7), axis=1)[:, None].to(tl.float32)
                            * (xscale if t < KU else qscale))
        out = tl.sum(acc, axis=1)
        if MODE == 5:
            if ONE_GROUP:
                out += tl.sum(accn, axis=1)
            if G5:
                out += tl.sum(acc5, axis=1)
        if MODE == 6:
            if SWPG < BLOCK_W:
                out = tl.sum(accg, axis=1)
        if NOUT == 2:
            tl.store(tl.where(rows < M1, y_ptr + tok * M1 + rows, y1_ptr + tok * (M - M1) + (rows - M1)),
                     out.to(y_ptr.dtype.element_ty), mask=rmask)
        elif NOUT == 3:
            dst = tl.where(rows < M2, y1_ptr + tok * (M2 - M1) + (rows - M1), y2_ptr + tok * (M - M2) + (rows - M2))
            tl.store(tl.where(rows < M1, y_ptr + tok * M1 + rows, dst), out.to(y_ptr.dtype.element_ty), mask=rmask)
        elif SPLIT == 1:
            tl.store(y_ptr + tok * M + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)
        else:
            tl.atomic_add(y_ptr + tok * M + rows, out, mask=rmask)

    @triton.jit
    def _prep_kernel(x_ptr, xd_ptr, xs_ptr, signs_ptr, v_ptr, amax_ptr, xp16_ptr, sc_ptr, xg_ptr, xqd_ptr, xqs_ptr,
                     K: tl.constexpr, G: tl.constexpr, PER: tl.constexpr, HAS_V: tl.constexpr, PAIRS: tl.constexpr,
                     CH: tl.constexpr, GS: tl.constexpr = 0, TRIGGER: tl.constexpr = False,
                     WAIT: tl.constexpr = False, XD: tl.constexpr = True, SCH: tl.constexpr = 0,
                     LOGB: tl.constexpr = 0):
        """CH columns of one token: the input in float32, de-interleaved for the GEMV (``xd[t, j, w] =
        x[t, w * PER + j]``) and summed per word (``xs[t, w]``); with HAS_V the DCT's FFT input ``v`` of
        each G-long group (signs applied, even entries in order, odd entries reversed behind them:
        Makhoul's reordering); PAIRS 1: the chunk's ``max |x|`` (for mode 5's scale per token);
        PAIRS 2: the chunk's 16-bit pairs and scale ``max |x| / 32767`` (``sc[t, chunk]``, mode 6), and
        ``xd``/``xs`` of the rounded input, so mode 6 computes ``x_r W^T`` for that one rounded ``x_r``;
        GS > 0: sums over GS-column groups (``xg``, mode 6; GS divides CH). TRIGGER: let a GEMV launched
        with programmatic dependent launch start at once (:func:`_gdc_launch_dependents`). WAIT: this kernel
        was itself launched with programmatic dependent launch (it starts while the kernel before it ends)
        and waits for that kernel before it reads or writes memory. XD False: ``xd`` is not written (mode 6
        reads the pairs and sums only). SCH > CH (PAIRS 2): the scale's chunk is SCH columns, shared by
        SCH / CH programs; each reads the whole chunk for its maximum and rounds its own CH columns (the
        chunk's first program stores the scale). LOGB > 0: the transformed input of the Hadamard transform too
        (blocks of ``2^LOGB`` columns, whole blocks a program, the signs of each G-long group: :func:`_fwht`),
        written de-interleaved and summed per word into ``xqd``/``xqs`` like ``xd``/``xs``, its chunk's
        ``max |xq|`` with PAIRS 1."""
        _pdl_start(TRIGGER, WAIT)
        tok = tl.program_id(0)
        c = tl.program_id(1) * CH + tl.arange(0, CH)
        m = c < K
        xv = tl.load(x_ptr + tok * K + c, mask=m, other=0.0).to(tl.float32)
        if PAIRS == 2:  # the sums below then add the rounded inputs the dot products see
            if SCH > CH:  # the chunk's maximum over all its programs' columns
                cs = (tl.program_id(1) // (SCH // CH)) * SCH + tl.arange(0, SCH)
                amax = tl.max(tl.abs(tl.load(x_ptr + tok * K + cs, mask=cs < K, other=0.0).to(tl.float32)), axis=0)
                nch = (K + SCH - 1) // SCH
                chunk = tl.program_id(1) // (SCH // CH)
            else:
                amax = tl.max(tl.abs(xv), axis=0)
                nch = tl.num_programs(1)
                chunk = tl.program_id(1)
            scale = tl.maximum(amax, 1e-30) / 32767.0
            SUB: tl.constexpr = SCH // CH if SCH > CH else 1
            tl.store(sc_ptr + tok * nch + chunk, scale, mask=tl.program_id(1) % SUB == 0)
            _store_pairs(xp16_ptr, tok, xv, scale, c, m, PER, K // PER, 8 // (32 // PER))
            qf = xv / scale
            rounded = tl.where(qf >= 0, qf + 0.5, qf - 0.5).to(tl.int32).to(tl.float32) * scale
            xv = tl.where(xv == xv, rounded, xv)  # a NaN stays NaN (max ignores it; its integer is garbage)
        if XD:
            tl.store(xd_ptr + tok * K + (c % PER) * (K // PER) + c // PER, xv, mask=m)
        wl = tl.program_id(1) * (CH // PER) + tl.arange(0, CH // PER)
        tl.store(xs_ptr + tok * (K // PER) + wl, tl.sum(tl.reshape(xv, (CH // PER, PER)), axis=1), mask=wl < K // PER)
        if PAIRS == 1:
            tl.store(amax_ptr + tok * 2 * tl.num_programs(1) + tl.program_id(1), tl.max(tl.abs(xv), axis=0))
        if GS > 0:
            gl = tl.program_id(1) * (CH // GS) + tl.arange(0, CH // GS)
            tl.store(xg_ptr + tok * (K // GS) + gl, tl.sum(tl.reshape(xv, (CH // GS, GS)), axis=1), mask=gl < K // GS)
        if HAS_V:
            _makhoul_store(v_ptr + tok * K, signs_ptr, xv, c, m, G)
        if LOGB > 0:
            xh = _fwht(xv * tl.load(signs_ptr + c % G, mask=m, other=0.0), CH, LOGB)
            tl.store(xqd_ptr + tok * K + (c % PER) * (K // PER) + c // PER, xh, mask=m)
            tl.store(xqs_ptr + tok * (K // PER) + wl, tl.sum(tl.reshape(xh, (CH // PER, PER)), axis=1),
                     mask=wl < K // PER)
            if PAIRS == 1:
                tl.store(amax_ptr + (tok * 2 + 1) * tl.num_programs(1) + tl.program_id(1), tl.max(tl.abs(xh), axis=0))

    @triton.jit
    def _fwht(v, CH: tl.constexpr, LOGB: tl.constexpr):
        """The normalised Walsh-Hadamard transform of each ``2^LOGB``-long block of the CH values ``v`` (blocks
        aligned to CH, which they divide): butterflies ``(a, b) -> (a + b, a - b)`` at strides 1, 2, ...,
        ``2^(LOGB-1)``, the stages and float32 operations of :func:`quantune.transforms._fwht`, then the division
        by ``sqrt(2^LOGB)``."""
        for st in tl.static_range(LOGB):  # stride 2^st: (segments, 2, stride) viewed as (segments, stride, 2)
            pairs = tl.permute(tl.reshape(v, (CH // (2 << st), 2, 1 << st)), (0, 2, 1))
            a, b = tl.split(pairs)
            v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (CH,))
        return v / ((1 << (LOGB // 2)) * (1.4142135623730951 if LOGB % 2 else 1.0))  # sqrt(2^LOGB), as torch's

    @triton.jit
    def _fwht_kernel(x_ptr, signs_ptr, out_ptr, K: tl.constexpr, G: tl.constexpr, CH: tl.constexpr,
                     LOGB: tl.constexpr):
        """Many tokens' Hadamard-transformed input (prefill): CH columns (whole ``2^LOGB`` blocks) of one token,
        the signs of each G-long group, :func:`_fwht`, stored in ``out``'s dtype."""
        tok = tl.program_id(0)
        c = tl.program_id(1) * CH + tl.arange(0, CH)
        m = c < K
        xv = tl.load(x_ptr + tok * K + c, mask=m, other=0.0).to(tl.float32)
        xh = _fwht(xv * tl.load(signs_ptr + c % G, mask=m, other=0.0), CH, LOGB)
        tl.store(out_ptr + tok * K + c, xh, mask=m)

    @triton.jit
    def _makhoul_store(v_row, signs_ptr, xv, c, m, G: tl.constexpr):
        """The DCT's FFT input for the columns ``c`` of one row (``v_row`` its start): each G-long group
        times the signs, even entries in order, odd entries reversed behind them (Makhoul's reordering)."""
        local = c % G
        sv = xv * tl.load(signs_ptr + local, mask=m, other=0.0)
        dest = tl.where(local % 2 == 0, local // 2, G - 1 - local // 2)
        tl.store(v_row + (c // G) * G + dest, sv, mask=m)

    @triton.jit
    def _dct_values(f_ptr, tw_ptr, row, c, m, K: tl.constexpr, G: tl.constexpr):
        """``X_k = Re(t_k V_k)`` for the columns ``c`` of row ``row`` from each G-long group's half
        spectrum ``rfft(v)`` (interleaved re/im; ``V_k = conj(V_{G-k})`` above G/2), float32."""
        k = c % G
        low = k <= G // 2
        idx = tl.where(low, k, G - k)
        base = f_ptr + (row * (K // G) + c // G) * ((G // 2 + 1) * 2)
        re = tl.load(base + idx * 2, mask=m, other=0.0)
        im = tl.load(base + idx * 2 + 1, mask=m, other=0.0)
        im = tl.where(low, im, -im)
        return tl.load(tw_ptr + k * 2, mask=m, other=0.0) * re - tl.load(tw_ptr + k * 2 + 1, mask=m, other=0.0) * im

    @triton.jit
    def _dct_pre_kernel(x_ptr, signs_ptr, v_ptr, K: tl.constexpr, G: tl.constexpr, CH: tl.constexpr,
                        GATHER: tl.constexpr = False):
        """Prefill's DCT pre-step: one token's input (any float dtype) to the float32 FFT input
        (:func:`_makhoul_store`), CH columns a program. GATHER: the program owns CH columns of the output
        instead and loads their inputs (strided loads, contiguous stores; the other way round without).
        Rows indexed in 64 bits: prefill has many tokens."""
        tok = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * CH + tl.arange(0, CH)
        m = c < K
        if GATHER:
            d = c % G  # v[d] = x[2d] (d < ceil(G/2)), x[2 (G - 1 - d) + 1] above
            src = tl.where(d < G - G // 2, 2 * d, 2 * (G - 1 - d) + 1)
            xv = tl.load(x_ptr + tok * K + (c // G) * G + src, mask=m, other=0.0).to(tl.float32)
            tl.store(v_ptr + tok * K + c, xv * tl.load(signs_ptr + src, mask=m, other=0.0), mask=m)
        else:
            xv = tl.load(x_ptr + tok * K + c, mask=m, other=0.0).to(tl.float32)
            _makhoul_store(v_ptr + tok * K, signs_ptr, xv, c, m, G)

    @triton.jit
    def _dct_out_kernel(f_ptr, tw_ptr, xq_ptr, K: tl.constexpr, G: tl.constexpr, CH: tl.constexpr):
        """Prefill's DCT post-step: CH columns of one token's ``xq`` (:func:`_dct_values`), stored in
        the output's dtype in the input's own column order."""
        tok = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * CH + tl.arange(0, CH)
        m = c < K
        out = _dct_values(f_ptr, tw_ptr, tok, c, m, K, G)
        tl.store(xq_ptr + tok * K + c, out.to(xq_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dct_post_kernel(f_ptr, tw_ptr, xqd_ptr, xqs_ptr, amax_ptr, K: tl.constexpr, G: tl.constexpr,
                         PER: tl.constexpr, PAIRS: tl.constexpr, CH: tl.constexpr, TRIGGER: tl.constexpr = False,
                         WAIT: tl.constexpr = False):
        """``xq`` (:func:`_dct_values`) for CH columns of one token, written de-interleaved and summed per
        word like :func:`_prep_kernel`'s ``xd``/``xs``; with PAIRS the chunk's ``max |xq|``. TRIGGER, WAIT:
        as in :func:`_prep_kernel`."""
        _pdl_start(TRIGGER, WAIT)
        tok = tl.program_id(0)
        c = tl.program_id(1) * CH + tl.arange(0, CH)
        m = c < K
        out = _dct_values(f_ptr, tw_ptr, tok, c, m, K, G)
        tl.store(xqd_ptr + tok * K + (c % PER) * (K // PER) + c // PER, out, mask=m)
        wl = tl.program_id(1) * (CH // PER) + tl.arange(0, CH // PER)
        tl.store(xqs_ptr + tok * (K // PER) + wl, tl.sum(tl.reshape(out, (CH // PER, PER)), axis=1), mask=wl < K // PER)
        if PAIRS:
            tl.store(amax_ptr + (tok * 2 + 1) * tl.num_programs(1) + tl.program_id(1), tl.max(tl.abs(out), axis=0))

    @triton.jit
    def _pairs_kernel(xd_ptr, xqd_ptr, amax_ptr, xp16_ptr, xqp16_ptr, sc_ptr, qsc_ptr, K: tl.constexpr,
                      PER: tl.constexpr, HAS_Q: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr,
                      TRIGGER: tl.constexpr = False, WAIT: tl.constexpr = False):
        """GEMV mode 5's 16-bit inputs for CH columns of one token, from the de-interleaved inputs and
        the token's ``max |x|`` (``max |xq|``): the maximum of the kernels above's per-chunk maxima.
        TRIGGER, WAIT: as in :func:`_prep_kernel`."""
        _pdl_start(TRIGGER, WAIT)
        tok = tl.program_id(0)
        c = tl.program_id(1) * CH + tl.arange(0, CH)
        m = c < K
        src = tok * K + (c % PER) * (K // PER) + c // PER
        chunks = tl.arange(0, NCH)
        cm = chunks < tl.num_programs(1)
        scale = tl.maximum(tl.max(tl.load(amax_ptr + tok * 2 * tl.num_programs(1) + chunks, mask=cm, other=0.0),
                                  axis=0), 1e-30) / 32767.0
        tl.store(sc_ptr + tok, scale)
        _store_pairs(xp16_ptr, tok, tl.load(xd_ptr + src, mask=m, other=0.0), scale, c, m, PER, K // PER,
                     8 // (32 // PER))
        if HAS_Q:
            qmax = tl.load(amax_ptr + (tok * 2 + 1) * tl.num_programs(1) + chunks, mask=cm, other=0.0)
            qscale = tl.maximum(tl.max(qmax, axis=0), 1e-30) / 32767.0
            tl.store(qsc_ptr + tok, qscale)
            _store_pairs(xqp16_ptr, tok, tl.load(xqd_ptr + src, mask=m, other=0.0), qscale, c, m, PER, K // PER,
                         8 // (32 // PER))

    @triton.jit
    def _dot3(t_hi, t_lo, d, LEFT: tl.constexpr, PRECISION: tl.constexpr):
        """A constant table times data, ``t @ d`` (LEFT) or ``d @ t``, the table given as its tf32 high part and
        float32 remainder (:func:`tf32_split`). PRECISION "tf32x3": three tf32 products (``t_hi d_lo + t_lo
        d_hi + t_hi d_hi``, d split here), float32 accuracy from the tensor cores without splitting the table
        in every program (Triton's own tf32x3 splits both operands each time); else one product of PRECISION."""
        if PRECISION == "tf32x3":
            d_hi = (d.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 10 mantissa bits kept
            d_lo = d - d_hi
            if LEFT:
                out = tl.dot(t_hi, d_lo, input_precision="tf32") + tl.dot(t_lo, d_hi, input_precision="tf32")
                out = tl.dot(t_hi, d_hi, out, input_precision="tf32")
            else:
                out = tl.dot(d_lo, t_hi, input_precision="tf32") + tl.dot(d_hi, t_lo, input_precision="tf32")
                out = tl.dot(d_hi, t_hi, out, input_precision="tf32")
        elif LEFT:
            out = tl.dot(t_hi + t_lo, d, input_precision=PRECISION)
        else:
            out = tl.dot(d, t_hi + t_lo, input_precision=PRECISION)
        return out

    @triton.jit
    def _dct_stage1_kernel(x_ptr, xd_ptr, xs_ptr, xp16_ptr, sc_ptr, en_ptr, signs_ptr, f2_ptr, tw_ptr, a_ptr,
                           K: tl.constexpr, G: tl.constexpr, N1: tl.constexpr, N1P: tl.constexpr, N2: tl.constexpr,
                           PER: tl.constexpr, CH: tl.constexpr, RED: tl.constexpr, PRECISION: tl.constexpr,
                           TRIGGER: tl.constexpr = False, WAIT: tl.constexpr = False):
        """First of the two launches of kashin's input preparation (:func:`dft_split`); each program has one
        job and one round of dependent loads. The first ``groups * N1P / 16 * N2 / 32`` programs: stage one
        of each group's G-point FFT of Makhoul's reordering ``v`` of ``signs * x``, ``G = N1 N2``, ``n = n1 +
        N1 n2``: ``A[n1, k2] = w_G^(n1 k2) sum_n2 v[n1 + N1 n2] w_N2^(n2 k2)`` for 16 n1 by 32 k2, one
        ``tl.dot`` with ``f2`` (the N2-point DFT matrix, real and imaginary parts interleaved by column), the
        twiddles ``tw``; stored as float32 real and imaginary planes, and the program's part of each column's
        energy ``sum_n1 |A[n1, k2]|^2`` (``en[t, group, n1 block, k2]``: the second launch's bound on its
        outputs). The next ``ceil(K / CH)`` programs: x's GEMV inputs for CH columns (de-interleaved, summed
        per word, rounded to 16 bits with the token's ``max |x| / 32767``, read whole by each). The constant
        tables are loaded before the wait for the kernel before (WAIT: launched with programmatic dependent
        launch), since no kernel writes them. TRIGGER: let the next kernel start at once."""
        if TRIGGER:
            _gdc_launch_dependents()
        tok = tl.program_id(0)
        p = tl.program_id(1)
        NB1: tl.constexpr = N1P // 16
        NK2: tl.constexpr = N2 // 32
        NS1: tl.constexpr = (K // G) * NB1 * NK2
        if p < NS1:
            g = p // (NB1 * NK2)
            n1 = ((p // NK2) % NB1) * 16 + tl.arange(0, 16)
            k2 = (p % NK2) * 32 + tl.arange(0, 32)
            n2 = tl.arange(0, N2)
            fidx = n2[:, None] * (2 * N2) + (p % NK2) * 64 + tl.arange(0, 64)[None, :]
            f2_hi = tl.load(f2_ptr + fidx)
            f2_lo = tl.load(f2_ptr + 2 * N2 * N2 + fidx)
            tidx = n1[:, None] * N2 + k2[None, :]
            twr = tl.load(tw_ptr + tidx)
            twi = tl.load(tw_ptr + N1P * N2 + tidx)
            rm = (n1 < N1)[:, None]
            pos = n1[:, None] + N1 * n2[None, :]                             # index into v
            src = tl.where(pos < G // 2, 2 * pos, 2 * (G - 1 - pos) + 1)      # Makhoul's reordering
            sg = tl.load(signs_ptr + src, mask=rm, other=0.0)
            if WAIT:
                _gdc_wait()
            v = tl.load(x_ptr + tok * K + g * G + src, mask=rm, other=0.0).to(tl.float32) * sg
            ar, ai = tl.split(tl.reshape(_dot3(f2_hi, f2_lo, v, False, PRECISION), (16, 32, 2)))
            out_r = ar * twr - ai * twi
            out_i = ar * twi + ai * twr
            base = a_ptr + (tok * (K // G) + g) * 2 * N1P * N2
            tl.store(base + tidx, out_r)
            tl.store(base + N1P * N2 + tidx, out_i)
            tl.store(en_ptr + ((tok * (K // G) + g) * NB1 + (p // NK2) % NB1) * N2 + k2,
                     tl.sum(out_r * out_r + out_i * out_i, axis=0))
        else:
            if WAIT:
                _gdc_wait()
            amax = tl.zeros([RED], dtype=tl.float32)
            for r0 in tl.static_range(0, K, RED):  # unrolled: every load is issued before the first use
                cc = r0 + tl.arange(0, RED)
                amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + tok * K + cc, mask=cc < K, other=0.0).to(tl.float32)))
            scale = tl.maximum(tl.max(amax, axis=0), 1e-30) / 32767.0
            q = p - NS1
            if q == 0:
                tl.store(sc_ptr + tok, scale)
            c = q * CH + tl.arange(0, CH)
            m = c < K
            xv = tl.load(x_ptr + tok * K + c, mask=m, other=0.0).to(tl.float32)
            tl.store(xd_ptr + tok * K + (c % PER) * (K // PER) + c // PER, xv, mask=m)
            wl = q * (CH // PER) + tl.arange(0, CH // PER)
            tl.store(xs_ptr + tok * (K // PER) + wl, tl.sum(tl.reshape(xv, (CH // PER, PER)), axis=1),
                     mask=wl < K // PER)
            _store_pairs(xp16_ptr, tok, xv, scale, c, m, PER, K // PER, 8 // (32 // PER))

    @triton.jit
    def _dct_stage2_kernel(a_ptr, f1_ptr, tw_ptr, en_ptr, xqd_ptr, xqs_ptr, xqp16_ptr, qsc_ptr,
                           K: tl.constexpr, G: tl.constexpr, N1: tl.constexpr, N1P: tl.constexpr, N2: tl.constexpr,
                           PER: tl.constexpr, NGP: tl.constexpr, PRECISION: tl.constexpr,
                           TRIGGER: tl.constexpr = False, WAIT: tl.constexpr = False, BK2: tl.constexpr = 16,
                           TRIGGER_LATE: tl.constexpr = False, RCH: tl.constexpr = 0):
        """Second launch (:func:`_dct_stage1_kernel`): stage two, ``V[k2 + N2 k1] = sum_n1 w_N1^(n1 k1) A[n1,
        k2]`` for 16 k1 by BK2 k2 per program, the complex product as two real products over both planes of
        A (``f1``: the N1-point DFT matrix as ``[Re, -Im]`` and ``[Im, Re]`` rows, :func:`_dot3`); then the DCT ``xq_k =
        Re(t_k V_k)`` (``tw``: :func:`quantune.transforms.dct_twiddle`), written as the GEMV reads it:
        de-interleaved, summed per word (BK2 consecutive k2 hold whole words), and rounded to 16 bits with one
        scale per token known before any output is: stage two is an N1-point DFT of each column ``A[:, k2]``,
        so by Parseval ``|V[k2 + N2 k1]|^2 <= N1 sum_n1 |A[n1, k2]|^2``, and ``|t_k| <= sqrt(2 / G)``; every
        program reads the column energies of the first launch (``en``; NGP: the groups rounded up to a power of
        two) and takes ``max_k2 sqrt(2 N1 E_k2 / G) / 32767``. A bound for any input; on random ones it lies
        about 3.6x above the largest output at G = 4096, about 2 of the 16 bits (``||x||_2``, the plain bound,
        lies 18x above). The tables load before the wait, as in the first launch. TRIGGER_LATE: the next kernel
        may start only once this one has waited for the first launch (a GEMV with LATE reads x's inputs at its
        start). RCH: the product's reduction (A's 2 N1P stacked rows) in steps of RCH rows, after the wait (long
        groups, :data:`DCT_MAX_N1`: the whole 16 x 2 N1P tables and a 2 N1P x BK2 slice of A spill registers
        beyond N1P = 64); 0, or RCH >= 2 N1P: one step, the tables loaded before the wait."""
        if TRIGGER and not TRIGGER_LATE:
            _gdc_launch_dependents()
        tok = tl.program_id(0)
        p = tl.program_id(1)
        tl.static_assert(N2 % BK2 == 0 and BK2 % PER == 0, "stage two: BK2 divides N2 and holds whole words")
        NB2: tl.constexpr = N2 // BK2
        NK1: tl.constexpr = N1P // 16
        g = p // (NB2 * NK1)
        k2 = ((p // NK1) % NB2) * BK2 + tl.arange(0, BK2)
        k1 = (p % NK1) * 16 + tl.arange(0, 16)
        km = (k1 < N1)[:, None]
        k = k2[None, :] + N2 * k1[:, None]
        t_re = tl.load(tw_ptr + k * 2, mask=km, other=0.0)
        t_im = tl.load(tw_ptr + k * 2 + 1, mask=km, other=0.0)
        spec_ptr = a_ptr + (tok * (K // G) + g) * 2 * N1P * N2  # both planes: (2 N1P, N2)
        PART: tl.constexpr = 2 * N1P * N1P  # one of the table's four parts: (hi, lo) x (Re row, Im row)
        if RCH == 0 or RCH >= 2 * N1P:
            j = tl.arange(0, 2 * N1P)
            fidx = k1[:, None] * (2 * N1P) + j[None, :]
            re_hi = tl.load(f1_ptr + fidx)
            im_hi = tl.load(f1_ptr + PART + fidx)
            re_lo = tl.load(f1_ptr + 2 * PART + fidx)
            im_lo = tl.load(f1_ptr + 3 * PART + fidx)
            if WAIT:
                _gdc_wait()
            if TRIGGER and TRIGGER_LATE:
                _gdc_launch_dependents()
            spec = tl.load(spec_ptr + j[:, None] * N2 + k2[None, :])
            v_re = _dot3(re_hi, re_lo, spec, True, PRECISION)
            v_im = _dot3(im_hi, im_lo, spec, True, PRECISION)
        else:
            tl.static_assert(N1P % RCH == 0, "stage two: RCH divides N1P (a step stays in one plane of A)")
            if WAIT:
                _gdc_wait()
            if TRIGGER and TRIGGER_LATE:
                _gdc_launch_dependents()
            v_re = tl.zeros([16, BK2], dtype=tl.float32)
            v_im = tl.zeros([16, BK2], dtype=tl.float32)
            NCP: tl.constexpr = (N1 + RCH - 1) // RCH  # steps a plane: the rows past N1 are zero (padding)
            for r in tl.range(0, 2 * NCP):
                j = (r // NCP) * N1P + (r % NCP) * RCH + tl.arange(0, RCH)
                fidx = k1[:, None] * (2 * N1P) + j[None, :]
                spec = tl.load(spec_ptr + j[:, None] * N2 + k2[None, :])
                v_re += _dot3(tl.load(f1_ptr + fidx), tl.load(f1_ptr + 2 * PART + fidx), spec, True, PRECISION)
                v_im += _dot3(tl.load(f1_ptr + PART + fidx), tl.load(f1_ptr + 3 * PART + fidx), spec, True,
                              PRECISION)
        gi = tl.arange(0, NGP)[:, None, None]
        ei = tl.load(en_ptr + ((tok * (K // G) + gi) * NK1 + tl.arange(0, NK1)[None, :, None]) * N2
                     + tl.arange(0, N2)[None, None, :], mask=gi < K // G, other=0.0)
        xq = t_re * v_re - t_im * v_im
        c = g * G + k
        tl.store(xqd_ptr + tok * K + (c % PER) * (K // PER) + c // PER, xq, mask=km)
        wl = (g * G + N2 * k1[:, None] + ((p // NK1) % NB2) * BK2) // PER + tl.arange(0, BK2 // PER)[None, :]
        tl.store(xqs_ptr + tok * (K // PER) + wl, tl.sum(tl.reshape(xq, (16, BK2 // PER, PER)), axis=2), mask=km)
        qmax = tl.sqrt(tl.max(tl.max(tl.sum(ei, axis=1), axis=1), axis=0) * (2.0 * N1 / G))
        qscale = tl.maximum(qmax, 1e-30) / 32767.0
        if p == 0:
            tl.store(qsc_ptr + tok, qscale)
        _store_pairs(xqp16_ptr, tok, xq, qscale, c, km, PER, K // PER, 8 // (32 // PER))

    @triton.jit
    def _decode_kernel(w_ptr, a_ptr, bx_ptr, bq_ptr, u_ptr, v_ptr, M, stride_w, groups,
                       K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, KU: tl.constexpr,
                       MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, SYM: tl.constexpr = False,
                       HALF: tl.constexpr = False):
        """Decode the factors to bf16 at memory speed for prefill: ``u = bx + sum_{t<KU} a_t bit_t``
        (the weight itself when there is no transformed factor) and ``v = bq + sum_{t>=KU} a_t bit_t``
        (kashin's factor in the transformed basis). One program: BLOCK_M rows x BLOCK_W words, decoded
        as a (rows, words, PER) tile in the weight's own column order, so each thread writes its
        word's PER values as one contiguous vector.

        MODE (DECODE_MODES): 0 planes (the sums above, from ``form.a``/``bx``/``bq``); 1 affine (rtn:
        ``u = offset + scale * code`` from ``level_tables``: ``bx_ptr`` offsets, ``a_ptr`` scales). (Mode 2, kashin's
        levels looked up in per-(row, group) tables, lost to the planes and was removed in the twenty-seventh
        session.) HALF (mode 0): ``a_ptr`` holds the stored float16
        coefficients ``c`` (:func:`_coefh`, :func:`_offset`)."""
        PER: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PER
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        widx = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        jj = tl.arange(0, PER)
        rmask = rows < M
        word = tl.load(w_ptr + rows[:, None] * stride_w + widx[None, :], mask=rmask[:, None], other=0)
        code = (word[:, :, None] >> (jj * BITS)[None, None, :]) & ((1 << BITS) - 1)
        if WPG % BLOCK_W == 0:  # the tile lies in one group: one coefficient index per row, broadcast
            coef = (rows * groups + (tl.program_id(1) * BLOCK_W) // WPG)[:, None]
        else:
            coef = rows[:, None] * groups + widx[None, :] // WPG
        cmask = rmask[:, None]
        smask = rmask[:, None, None]
        if MODE == 1:
            scale, offset = _affine(a_ptr, bx_ptr, coef, cmask, SYM, BITS)
            u = offset[:, :, None] + scale[:, :, None] * code.to(tl.float32)
            v = u
        else:
            if HALF:  # each c_t loaded once: a_t = 2 c_t, bx = -sum_{t<KU} c_t, bq = -sum_{t>=KU} c_t
                h0, h1, h2, h3, h4, h5, h6, h7 = _coefh8(a_ptr, coef, cmask, BITS)
                bx = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
                bq = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
                for t in tl.static_range(BITS):
                    if t < KU:
                        bx -= _pick(t, h0, h1, h2, h3, h4, h5, h6, h7) * 0.5
                    else:
                        bq -= _pick(t, h0, h1, h2, h3, h4, h5, h6, h7) * 0.5
            else:
                bx = tl.load(bx_ptr + coef, mask=cmask, other=0.0)
                bq = tl.load(bq_ptr + coef, mask=cmask, other=0.0)
            u = bx[:, :, None] + tl.zeros([BLOCK_M, BLOCK_W, PER], tl.float32)
            v = bq[:, :, None] + tl.zeros([BLOCK_M, BLOCK_W, PER], tl.float32)
            for t in tl.static_range(BITS):
                if HALF:
                    a_t = _pick(t, h0, h1, h2, h3, h4, h5, h6, h7)[:, :, None]
                else:
                    a_t = tl.load(a_ptr + coef * BITS + t, mask=cmask, other=0.0)[:, :, None]
                bit = ((code >> t) & 1).to(tl.float32)
                if t < KU:
                    u += a_t * bit
                else:
                    v += a_t * bit
        out = rows[:, None, None] * K + widx[None, :, None] * PER + jj[None, None, :]
        tl.store(u_ptr + out, u.to(tl.bfloat16), mask=smask)
        if KU < BITS:
            tl.store(v_ptr + out, v.to(tl.bfloat16), mask=smask)

    @triton.jit
    def _decode_joined_kernel(w_ptr, a_ptr, bx_ptr, bq_ptr, r_ptr, out_ptr, M, stride_w, groups, rows_per_prog,
                              K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, KU: tl.constexpr,
                              BLOCK_M: tl.constexpr, BF16: tl.constexpr = True, DECODE: tl.constexpr = 1,
                              EVEN: tl.constexpr = False, HALF: tl.constexpr = False):
        """kashin's whole weight for prefill, one GEMM's worth: per group ``w = u + v R`` with ``u`` and ``v`` the
        two factors and ``R`` ``(GROUP, GROUP)`` the seeded transform's matrix (row i: ``(Q e_i)^T``, bf16), a bf16
        tensor-core product with float32 sums (``v`` in bf16 as the two-GEMM path stores it). One program: one
        group of ``rows_per_prog`` rows, BLOCK_M at a time, ``R`` loaded once. BF16 False: ``R`` and the product
        in float32 (the CPU interpreter, whose bf16 dot products are wrong). EVEN: every tile is whole (no row
        masks).

        DECODE (:data:`JOINED_DECODES`), each reading a tile's coefficients as one 2-D load of the form's own
        layout (each row's values for the group contiguous): 0 "bits", ``u = bx + sum_{t<KU} a_t bit_t`` and
        ``v = bq + sum_{t>=KU} a_t bit_t`` from ``form.a``/``bx``/``bq``; 1 "signs", the same sums as ``bx +
        sum_t c_t + sum_t +-c_t`` with ``c_t = a_t / 2``: each term ``-c_t`` with its sign bit flipped by the
        code's bit (a shift and a logic op, no integer-to-float conversion). (Looking each weight's two levels up
        with ``tl.gather`` compiled here with Triton 3.6 but failed an assertion in the H200's Triton 3.6 build,
        OptimizeThreadLocality's ``isWarpLocal``: not kept.) HALF: ``a_ptr`` holds the stored float16 ``c``
        (``a_t = 2 c_t``, ``bx = -sum_{t<KU} c_t``): "signs" then starts from zero, ``u = sum_t +-c_t``."""
        PER: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PER
        gi = tl.program_id(1)
        ri = tl.arange(0, GROUP)
        r = tl.load(r_ptr + ri[:, None] * GROUP + ri[None, :])
        widx = gi * WPG + tl.arange(0, WPG)
        jj = tl.arange(0, PER)
        tt = tl.arange(0, BITS)
        cols = gi * GROUP + ri
        start = tl.program_id(0) * rows_per_prog
        for r0 in tl.range(start, tl.minimum(start + rows_per_prog, M), BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rmask = rows < M
            crow = tl.minimum(rows, M - 1) * groups + gi  # clamped: coefficient loads need no mask
            if EVEN:
                word = tl.load(w_ptr + rows[:, None] * stride_w + widx[None, :])
            else:
                word = tl.load(w_ptr + rows[:, None] * stride_w + widx[None, :], mask=rmask[:, None], other=0)
            if HALF:  # the stored float16 coefficients c: a_t = 2 c_t, bx = -sum_{t<KU} c_t, bq likewise
                half = tl.load(a_ptr + crow[:, None] * BITS + tt[None, :]).to(tl.float32)  # (BLOCK_M, BITS)
                coef = half * 2.0
                if DECODE == 1:  # u = sum_t c_t s_t from zero: the bases and the halves cancel
                    bx = tl.zeros([BLOCK_M], tl.float32)
                    bq = tl.zeros([BLOCK_M], tl.float32)
                else:
                    bx = -tl.sum(tl.where(tt[None, :] < KU, half, 0.0), axis=1)
                    bq = -tl.sum(tl.where(tt[None, :] < KU, 0.0, half), axis=1)
            else:
                coef = tl.load(a_ptr + crow[:, None] * BITS + tt[None, :])  # (BLOCK_M, BITS)
                bx = tl.load(bx_ptr + crow)
                bq = tl.load(bq_ptr + crow)
                if DECODE == 1:
                    half = coef * 0.5
                    bx += tl.sum(tl.where(tt[None, :] < KU, half, 0.0), axis=1)
                    bq += tl.sum(tl.where(tt[None, :] < KU, 0.0, half), axis=1)
            if DECODE == 1:
                negs = (-half).to(tl.uint32, bitcast=True)
                wu = word.to(tl.uint32, bitcast=True)[:, :, None]
            else:
                code = (word[:, :, None] >> (jj * BITS)[None, None, :]) & ((1 << BITS) - 1)
            u = bx[:, None, None] + tl.zeros([BLOCK_M, WPG, PER], tl.float32)
            v = bq[:, None, None] + tl.zeros([BLOCK_M, WPG, PER], tl.float32)
            for t in tl.static_range(BITS):
                if DECODE == 1:
                    n_t = tl.sum(tl.where(tt[None, :] == t, negs, 0), axis=1)
                    flip = (wu << (31 - jj * BITS - t)[None, None, :]) & 0x80000000
                    term = (n_t[:, None, None] ^ flip).to(tl.float32, bitcast=True)
                else:
                    a_t = tl.sum(tl.where(tt[None, :] == t, coef, 0.0), axis=1)
                    term = a_t[:, None, None] * ((code >> t) & 1).to(tl.float32)
                if t < KU:
                    u += term
                else:
                    v += term
            v2 = tl.reshape(v, (BLOCK_M, GROUP))
            u2 = tl.reshape(u, (BLOCK_M, GROUP))
            if BF16:
                v2 = v2.to(tl.bfloat16)
            w = u2 + tl.dot(v2, r)
            if EVEN:
                tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty))
            else:
                tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
                         mask=rmask[:, None])


DECODE_MODES = {0: "planes", 1: "affine"}


def decode_bf16(packed: torch.Tensor, form: BitplaneForm, bits: int, k: int, block_m: int | None = None,
                block_w: int | None = None, num_warps: int = 4, tables: tuple | None = None,
                mode: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The factors as bf16 ``(out, k)`` matrices for prefill: ``(W, None)`` for a format without a
    transformed factor, ``(U, V)`` for kashin (``W = U + V Q^T`` per group, so ``x W^T = x U^T +
    (x Q) V^T``). Same word layout and limits as :func:`gemv_matmul`. ``mode``: :data:`DECODE_MODES`
    (default affine for rtn, planes otherwise); ``tables``: :func:`level_tables` when the caller has them.
    Tiles (``block_m`` rows x ``block_w`` words per program), measured on the H200
    (eval/results/kernel_sweeps/sweep_decode*.json): the affine mode 4 x 64 (rtn-4 4096x4096 11.3 us
    against 22.1 at 16 x 32), the others 16 rows x 256 weights (kashin-4 4096x4096 27.9 us, 29.3 at 8 rows)."""
    if triton is None:
        raise RuntimeError("the decode kernel needs triton")
    if not gemv_supported(form, bits, packed.shape[1]):
        raise ValueError(f"the decode kernel needs 2, 4 or 8-bit codes in groups of whole 32-bit words "
                         f"({bits} bits, group {form.group})")
    if mode != 0 and tables is None:
        tables = level_tables(form, bits)
    if mode is None:  # measured on the H200: tables lost to planes for kashin (eval/results/bench_kernels.md)
        mode = 1 if tables[2] else 0
    if mode not in DECODE_MODES or (mode == 1 and not tables[2]):
        raise ValueError(f"decode mode {mode} does not serve this format (modes: {DECODE_MODES})")
    m, words = packed.shape[0], packed.shape[1] // 4
    if block_m is None:
        block_m = 4 if mode == 1 else 16
    block_w = block_w or (64 if mode == 1 else max(1, 256 // (32 // bits)))
    tile = min(block_w, words & (-words))
    w = packed.view(torch.int32)
    u = torch.empty(m, k, device=packed.device, dtype=torch.bfloat16)
    v = torch.empty_like(u) if form.ku < bits else None
    sym, half = False, False
    if mode == 0:
        a, bx, bq, half = coef_args(form)
    else:
        a, bx, sym = affine_args(tables)
        bq = bx
    launch(_decode_kernel, (_cdiv(m, block_m), words // tile),
        w, a, bx, bq, u, u if v is None else v, m, w.stride(0), form.groups, K=k,
        GROUP=form.group, BITS=bits, KU=form.ku, MODE=mode, BLOCK_M=block_m, BLOCK_W=tile,
        SYM=sym, HALF=half, num_warps=num_warps)
    return u, v


def prefill_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int,
                   factors: tuple | None = None, tables: tuple | None = None) -> torch.Tensor:
    """``x W^T`` for many tokens in ``x.dtype`` (bf16/fp16): decode the factors to bf16 (or take
    ``factors`` from :func:`decode_bf16`), then cuBLAS: one GEMM, or for kashin two (``x U^T``
    plus ``(x Q) V^T`` accumulated into the same output). kashin in groups that
    :func:`joined_decode_supported` serves: the whole weight ``U + V Q^T`` decoded by
    :func:`decode_joined_bf16`, then one GEMM (no transform of the input)."""
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if factors is None and JOINED_PREFILL and joined_decode_supported(form, bits):
        return x.to(dtype) @ decode_joined_bf16(packed, form, bits, x.shape[-1]).to(dtype).T
    u, v = factors if factors is not None else decode_bf16(packed, form, bits, x.shape[-1], tables=tables)
    y = x.to(dtype) @ u.to(dtype).T
    if v is not None:
        y.addmm_(prefill_transformed_input(x, form, dtype), v.to(dtype).T)
    return y


JOINED_PREFILL = True  # kashin in small groups: prefill decodes the whole weight (one GEMM; False: two GEMMs)
JOINED_MAX_GROUP = 128  # the transform's (G, G) matrix goes through shared memory (bf16: 32 KB at 128; 256 would not fit)
JOINED_BLOCK_M = 64  # rows a program of the joined decode takes at a time
JOINED_PROGRAMS = 1024  # about this many programs, each one group over a run of rows (R loaded once each)
# Tile, programs and decode measured on the H200 (kashin-4; 4096x4096 g64 / g128, 8192x28672 g128, 14336x4096 g128):
# 64 rows, 4 warps, 1024 programs, signs 32.5 / 37.8 / 414.2 / 118.5 us, bits 42.6 / 48.3 / 553.4 / 152.6, 32 rows with
# signs 39.2 / 41.5 / 513.0 / 137.3 (kernel_sweeps/sweep_joined_decode_v3.json, this code); the wider sweep of
# sweep_joined_decode_v2.json (coefficients then in a transposed copy) had the same tile within 4% of each case's
# best of 24. kashin-2 decodes slower with this code than with that copy (4096x4096 g128 37.2 against 27.0 us,
# bench_kernels_kashin_g128_v3 / _v2), not yet explained.


def joined_decode_supported(form: BitplaneForm, bits: int) -> bool:
    """Whether :func:`decode_joined_bf16` serves the format: a transformed factor, in groups of a power of two
    from 16 to :data:`JOINED_MAX_GROUP` columns, each a whole number of 32-bit words."""
    g = form.group
    return (triton is not None and form.ku < bits and bits in (1, 2, 4, 8) and 16 <= g <= JOINED_MAX_GROUP
            and g & (g - 1) == 0 and g % (32 // bits) == 0)


@functools.lru_cache(maxsize=64)
def group_basis(g: int, kind: str, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``R`` ``(g, g)``, row i the transform's ``Q e_i``: a group's row ``v`` in the transformed basis is ``v R``
    in the weight's (computed in float64 once per group size, transform, seed, device and dtype)."""
    from quantune.transforms import inverse_transform

    return inverse_transform(torch.eye(g, dtype=torch.float64), kind, seed).to(device=device, dtype=dtype).contiguous()


JOINED_DECODES = ("bits", "signs")  # how the joined decode turns codes into values (_decode_joined_kernel)
JOINED_DECODE = "signs"
# Software-pipelining stages of the joined decode's row loop (Triton's num_stages). Compiled for sm_90 with Triton
# 3.6, one stage (no asynchronous copies ahead) takes the 2-bit 64 x 128 tile from 1479 instructions to 796 and the
# 4-bit one from 1308 to 1263: kashin-2 decodes slower than kashin-4 at the default. Not yet measured on the H200
# (`python -m eval.sweep_joined_decode --stages 3,1`), so the default stays Triton's.
JOINED_STAGES = 3


def decode_joined_bf16(packed: torch.Tensor, form: BitplaneForm, bits: int, k: int,
                       block_m: int | None = None, num_warps: int = 4,
                       dtype: torch.dtype = torch.bfloat16, decode: str | None = None,
                       stages: int | None = None) -> torch.Tensor:
    """kashin's weight ``U + V Q^T`` as one bf16 ``(out, k)`` matrix (:func:`_decode_joined_kernel`), for the
    formats :func:`joined_decode_supported` serves. The transform's product runs on the tensor cores in bf16 with
    float32 sums: ``V`` rounded to bf16 as the two-GEMM path stores it, and ``R`` too. ``dtype``: the result's
    (float32 for checks). ``decode`` (:data:`JOINED_DECODES`, default :data:`JOINED_DECODE`): the planes' sums
    from converted bits or from flipped signs. ``stages``: the row loop's pipelining stages (default
    :data:`JOINED_STAGES`). The kernel reads the form's coefficients as they are: nothing is copied or kept."""
    if not joined_decode_supported(form, bits):
        raise ValueError(f"the joined decode needs kashin in groups of a power of two from 16 to {JOINED_MAX_GROUP} "
                         f"columns ({bits} bits, group {form.group}, {form.ku} planes on U)")
    decode = JOINED_DECODE if decode is None else decode
    if decode not in JOINED_DECODES:
        raise ValueError(f"unknown joined decode {decode!r}; choose one of {JOINED_DECODES}")
    m, g = packed.shape[0], form.group
    w = packed.view(torch.int32)
    out = torch.empty(m, k, device=packed.device, dtype=dtype)
    block_m = block_m or JOINED_BLOCK_M
    groups = k // g
    chunks = max(1, min(_cdiv(m, block_m), _cdiv(JOINED_PROGRAMS, groups)))
    per = _cdiv(_cdiv(m, chunks), block_m) * block_m  # rows a program
    bf16 = os.environ.get("TRITON_INTERPRET", "0") != "1"
    basis = group_basis(g, form.transform, form.seed, packed.device, torch.bfloat16 if bf16 else torch.float32)
    a, bx, bq, half = coef_args(form)
    launch(_decode_joined_kernel, (_cdiv(m, per), groups), w, a, bx, bq, basis, out,
           m, w.stride(0), groups, per, K=k, GROUP=g, BITS=bits, KU=form.ku, BLOCK_M=block_m, BF16=bf16,
           DECODE=JOINED_DECODES.index(decode), EVEN=m % block_m == 0, HALF=half, num_warps=num_warps,
           num_stages=JOINED_STAGES if stages is None else stages)
    return out


PREFILL_DCT = True  # prefill's DCT as two Triton passes around one batched rfft (False: the torch transform)
# (columns, warps, gather) of the pre pass and (columns, warps) of the post pass, measured on the H200 at 2048 tokens
# (eval/results/kernel_sweeps/sweep_prefill_dct.json): the post pass wants two columns a thread (K = 4096: 22 us
# against 37 at four and 69 at eight or more); the pre pass 12.9 us at 2048 x 4, gathering 17 us
PREFILL_DCT_TILES = ((2048, 4, False), (512, 8))


# kashin's Hadamard transform (QuantConfig.transform "hadamard") of the GEMV's and the prefill's input in Triton
# (_fwht: butterflies in registers, one program per token and whole blocks) instead of quantune.transforms' torch
# butterflies (a few torch launches a stage: 12 stages at 4096 columns); blocks of up to HADAMARD_MAX_BLOCK columns
# (a program holds a block: 64 KB of float32 at 16384), longer ones take the torch path. Not yet timed on the device.
HADAMARD_KERNEL = True
HADAMARD_MAX_BLOCK = 16384


def hadamard_log_block(form: BitplaneForm) -> int:
    """``log2`` of the Hadamard block the Triton kernels transform ``form``'s input with (the largest power of two
    dividing its group, :func:`quantune.transforms.hadamard_block_size`), or 0 where they do not: another
    transform, no Triton, :data:`HADAMARD_KERNEL` off, blocks of one column or longer than
    :data:`HADAMARD_MAX_BLOCK`."""
    if form.transform != "hadamard" or triton is None or not HADAMARD_KERNEL:
        return 0
    block = hadamard_block_size(form.group)
    return block.bit_length() - 1 if 2 <= block <= HADAMARD_MAX_BLOCK else 0


def hadamard_input(x: torch.Tensor, form: BitplaneForm, dtype: torch.dtype) -> torch.Tensor:
    """``xq`` ``(T, K)`` in ``dtype`` for the Hadamard transform (:func:`_fwht_kernel`), for any number of tokens;
    where :func:`hadamard_log_block` gives 0, the torch transform."""
    logb = hadamard_log_block(form)
    if not logb:
        return transformed_input(x.float(), form).to(dtype)
    t, k = x.shape
    ch = max(prep_columns(k, 1), 1 << logb)  # whole blocks a program, as in prepared_input
    out = torch.empty(t, k, device=x.device, dtype=dtype)
    launch(_fwht_kernel, (t, _cdiv(k, ch)), x.contiguous(),
           random_signs(form.group, form.seed, device=x.device, dtype=torch.float32), out, K=k, G=form.group, CH=ch,
           LOGB=logb, num_warps=hadamard_warps(ch))
    return out


def hadamard_warps(columns: int) -> int:
    """Warps for a program that transforms ``columns`` values (:func:`_fwht`): about 8 values a thread, 4 to 16
    warps. Compiled for sm_90 (Triton 3.6), the preparation kernel with a 4096-column block takes 6065 instructions
    at 4 warps, 3559 at 8 and 2291 at 16 (1458 / 1032 / 813 without the transform)."""
    return min(16, max(PREP_WARPS, columns // 256))


def prefill_transformed_input(x: torch.Tensor, form: BitplaneForm, dtype: torch.dtype) -> torch.Tensor:
    """``xq`` ``(T, K)`` in ``dtype`` for many tokens. The DCT (with triton, PREFILL_DCT): one pass
    casting and reordering into the FFT's float32 input (signs applied), one batched cuFFT ``rfft``,
    one pass taking the real part against the twiddles into ``dtype``: three passes over the data where
    the torch transform (:func:`transformed_input`: a complex FFT of the upcast input between
    cat/flip/multiply passes) makes about eight. The Hadamard transform: :func:`hadamard_input`."""
    if form.transform == "hadamard":
        return hadamard_input(x, form, dtype)
    if form.transform != "dct" or triton is None or not PREFILL_DCT:
        return transformed_input(x.float(), form).to(dtype)
    pre, post = PREFILL_DCT_TILES
    v = prefill_dct_pre(x.contiguous(), form, *pre)
    return prefill_dct_post(prefill_dct_spectrum(v, form), form, dtype, *post)


def prefill_dct_pre(x: torch.Tensor, form: BitplaneForm, columns: int, warps: int, gather: bool) -> torch.Tensor:
    """Prefill DCT's first pass: the float32 FFT input ``(T, K)`` of contiguous ``x`` (:func:`_dct_pre_kernel`)."""
    (t, k), g = x.shape, form.group
    v = torch.empty(t, k, device=x.device, dtype=torch.float32)
    launch(_dct_pre_kernel, (t, _cdiv(k, columns)), x, random_signs(g, form.seed, device=x.device, dtype=torch.float32),
           v, K=k, G=g, CH=columns, GATHER=gather, num_warps=warps)
    return v


def prefill_dct_spectrum(v: torch.Tensor, form: BitplaneForm) -> torch.Tensor:
    """Each group's half spectrum of the FFT input ``v``, as float32 (re, im) pairs: one batched rfft."""
    return torch.view_as_real(torch.fft.rfft(v.view(-1, form.group), dim=-1))


def prefill_dct_post(spectrum: torch.Tensor, form: BitplaneForm, dtype: torch.dtype, columns: int,
                     warps: int) -> torch.Tensor:
    """Prefill DCT's last pass: ``xq`` ``(T, K)`` in ``dtype`` from the groups' half spectra (:func:`_dct_out_kernel`)."""
    g = form.group
    k = form.groups * g
    t = spectrum.shape[0] // (k // g)
    xq = torch.empty(t, k, device=spectrum.device, dtype=dtype)
    twiddle = torch.view_as_real(dct_twiddle(g, spectrum.device, torch.float32))
    launch(_dct_out_kernel, (t, _cdiv(k, columns)), spectrum, twiddle, xq, K=k, G=g, CH=columns, num_warps=warps)
    return xq


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (triton.cdiv is a constexpr function, several microseconds a call from Python)."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` <= 1), on the host (see :func:`_cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def available() -> bool:
    return triton is not None


def _launch_setup(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int, block_k: int | None,
                  xq: torch.Tensor | None):
    """Checks and buffers the tiled fused kernels share: the K tile, float32 inputs, the
    transformed input (unless given), the output. Returns ``(block_k, x32, xq, y)``."""
    if triton is None:
        raise RuntimeError("the fused kernel needs triton")
    block_k = block_k or block_k_for(form.group)
    if block_k is None or form.group % block_k:
        raise ValueError(f"group {form.group} has no power-of-two tile >= 16")
    t = x.shape[0]
    if t > MAX_TOKENS:
        raise ValueError(f"the fused kernel serves at most {MAX_TOKENS} tokens, got {t}")
    x32 = x.float().contiguous()
    if xq is None:
        xq = transformed_input(x32, form).float().contiguous() if form.ku < bits else x32
    return block_k, x32, xq, torch.empty(t, packed.shape[0], device=x.device, dtype=torch.float32)


def bitplane_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int,
                    block_m: int = 4, block_k: int | None = None, num_warps: int = 1,
                    xq: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T`` ``(T, out)`` in float32 with the bit-plane kernel; ``x`` is ``(T, K)``.
    ``xq``: the transformed input when the caller has it already (benchmarks time it apart)."""
    block_k, x32, xq, y = _launch_setup(x, packed, form, bits, block_k, xq)
    (t, k), m = x.shape, packed.shape[0]
    launch(_bitplane_kernel, (_cdiv(m, block_m), t),
        packed, x32, xq, *(p.contiguous() for p in form.planes()), y,
        m, packed.stride(0), form.groups, form.group, K=k,
        BITS=bits, KU=form.ku, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return y


def levels_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int,
                  tables: tuple | None = None, block_m: int = 4, block_k: int | None = None, num_warps: int = 1,
                  xq: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T`` ``(T, out)`` in float32 with the level-table kernel (see :func:`level_tables`;
    pass ``tables`` to reuse them across calls)."""
    block_k, x32, xq, y = _launch_setup(x, packed, form, bits, block_k, xq)
    (t, k), m = x.shape, packed.shape[0]
    tables = tables if tables is not None else level_tables(form, bits)
    lu, lv, affine = tables
    sym = False
    if affine:  # u = offset + scale * code: the kernel's lu_ptr offsets, lv_ptr scales
        lv, lu, sym = affine_args(tables)
    launch(_levels_kernel, (_cdiv(m, block_m), t),
        packed, x32, xq, lu, lv, y, m, packed.stride(0), form.groups, form.group, K=k,
        BITS=bits, KU=form.ku, AFFINE=affine, BLOCK_M=block_m, BLOCK_K=block_k, SYM=sym, num_warps=num_warps)
    return y


def gemv_block_w(form: BitplaneForm, bits: int, block_w: int, split: int = 1) -> int | None:
    """The word tile of :func:`gemv_matmul` for a requested ``block_w``: inside one group, the largest
    power of two <= ``block_w`` dividing the group's words; across groups, ``block_w`` itself when it
    holds whole groups. It must divide each of the ``split`` K chunks. None when codes do not fill
    whole 32-bit words per group."""
    if 32 % bits or form.group % (32 // bits):
        return None
    wpg = form.group // (32 // bits)
    words = form.group * form.groups // (32 // bits)
    if words % split:
        return None
    chunk = words // split
    if wpg < block_w and block_w % wpg == 0 and chunk % block_w == 0:
        return block_w
    tile = min(wpg & (-wpg), block_w)
    while chunk % tile:
        tile //= 2
    return tile


def gemv_supported(form: BitplaneForm, bits: int, row_bytes: int) -> bool:
    return bits in (2, 4, 8) and gemv_block_w(form, bits, 1 << 30) is not None and row_bytes % 4 == 0


def deinterleave(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``(T, K)`` -> float32 ``(T, PER, K / PER)`` with ``[t, j, w] = x[t, w * PER + j]``: the input
    seen by code position within a word (PER = 32 / bits), so the GEMV kernel's loads are contiguous."""
    per = 32 // bits
    t, k = x.shape
    return x.float().reshape(t, k // per, per).transpose(1, 2).contiguous()


GEMV_MODES = {5: "plane sums (int16 dot products)", 6: "codes (int16 dot products)"}
# defaults: rtn (codes), kashin (plane sums). The float alternatives (0 rtn's codes as floats per weight, 1 per word
# through the float mantissa, 2 kashin's sign selects per weight, 3 its plane sums in float, 4 through the mantissa)
# and prefetching the next tile (words, or everything a mode 6 tile reads) were measured and never won
# (eval/results/kernel_sweeps/); they were removed in the twenty-seventh session. Modes 1 and 3 were the defaults
# only for 1-bit codes, which no format has (bits 2 to 8).
GEMV_MODE_CODES, GEMV_MODE_DOTS = 6, 5


def gemv_pairs(mode: int) -> bool | str:
    """The 16-bit inputs a GEMV mode reads (:func:`prepared_input`'s ``pairs``)."""
    return {5: True, 6: "chunk"}.get(mode, False)


def gemv_default_mode(affine: bool, bits: int) -> int:
    """The fastest mode measured on the H200 for a format (eval/results/bench_kernels.md): rtn's codes (6),
    kashin's plane sums (5)."""
    return GEMV_MODE_CODES if affine else GEMV_MODE_DOTS


def gemv_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int, block_m: int = 8,
                block_w: int = 64, num_warps: int = 4, split: int = 1, xq: torch.Tensor | None = None,
                affine: bool | None = None, mode: int | None = None, tables: tuple | None = None,
                prepared: tuple | None = None,
                out_dtype: torch.dtype = torch.float32, share: bool = True,
                outputs: tuple[int, ...] | None = None, evict: str | None = None,
                unroll: int = 1, late: bool | None = None, span: bool = False,
                group_sums: bool | None = None, hold: bool | None = None) -> torch.Tensor | list[torch.Tensor]:
    """``x W^T`` ``(T, out)`` in float32 with the word-reading GEMV kernel (2, 4 or 8-bit codes, groups of
    whole words); ``split`` programs share each row block along K. ``affine``: whether the format's levels
    are an affine grid (rtn); computed from ``form`` when not given. ``mode``: how codes are decoded
    (:data:`GEMV_MODES`; 6 needs an affine grid), default per format. ``tables``: :func:`level_tables` of the
    form when the caller has them. ``prepared``: :func:`prepared_input`'s result for ``x`` with the mode's
    ``pairs`` (:func:`gemv_pairs`), when the caller has it (benchmarks time the kernel alone). ``out_dtype``:
    of the result, rounded once from the float32 sums (float32 where ``split`` > 1: the programs add their
    parts atomically). ``share``: see :func:`prepared_input`.
    ``outputs``: the row counts of two or three layers whose codes and coefficients lie back to back in
    ``packed``/``form``/``tables`` (:func:`quantune.qlinear.colocate`): one launch, one result each
    (a list), for ``split`` 1 only. ``evict``: the L2 eviction policy of the codes' loads ("" or "evict_first",
    default :data:`GEMV_EVICT`). ``unroll``: the K loop unrolled this many times by the compiler (fewer address
    and loop instructions per tile). ``late`` (mode 5): x's planes in a first pass over the codes, xq's in a
    second, so the transformed input's last kernel runs beside the first pass (the kernel's LATE); None: where
    :func:`gemv_late` says. With ``prepared`` given and programmatic dependent launch, the caller guarantees that
    the kernel which wrote x's inputs has finished before the kernel right before this call. ``span`` (mode 6): a
    word tile may cover two chunks of the input's 16-bit rounding (two input scales), else it is clamped to one.
    ``group_sums`` (mode 5, groups shorter than a tile; default :data:`GEMV_GROUP_SUMS`): each plane's integer dots
    summed per group before one coefficient per (row, group), instead of a coefficient gathered per word.
    ``hold`` (with ``late``): the first pass keeps the codes in registers for the second (rows of at most
    :data:`HOLD_MAX_TILES` word tiles, no K split); None: :data:`GEMV_HOLD` where it applies."""
    if tables is None and (affine is None or affine):
        tables = level_tables(form, bits)
    if affine is None:
        affine = tables[2]
    if mode is None:
        mode = gemv_default_mode(affine, bits)
    if bits not in (2, 4, 8):
        raise ValueError(f"the word kernel serves 2, 4 and 8-bit codes, not {bits}")
    if mode == 6:  # a tile lies inside one chunk of the input's 16-bit rounding, or two (span)
        xch = rounding_columns(x.shape[1], bits)
        block_w = min(block_w, (2 if span else 1) * xch // (32 // bits))
    tile = gemv_block_w(form, bits, block_w, split)
    if tile is None or packed.shape[1] % 4:
        raise ValueError(f"the word kernel needs codes in groups of whole 32-bit words "
                         f"({bits} bits, group {form.group}, {packed.shape[1]} bytes per row, split {split})")
    if mode not in GEMV_MODES:
        raise ValueError(f"unknown GEMV mode {mode}; choose one of {sorted(GEMV_MODES)}")
    if mode == 6 and not affine:
        raise ValueError(f"GEMV mode {mode} ({GEMV_MODES[mode]}) needs an affine grid (rtn)")
    (t, k), m = x.shape, packed.shape[0]
    if outputs is not None and (len(outputs) not in (2, 3) or sum(outputs) != m or min(outputs) < 1 or split > 1):
        raise ValueError(f"outputs must be 2 or 3 positive row counts adding up to {m} rows, with split 1 "
                         f"(got {outputs}, split {split})")
    ys = [torch.empty(t, n, device=x.device, dtype=out_dtype) for n in outputs] if outputs else \
        [torch.empty(t, m, device=x.device, dtype=torch.float32 if split > 1 else out_dtype)]
    y = ys[0]
    bounds = [sum(outputs[:i]) for i in (1, 2)] if outputs else [m, m]
    if split > 1:  # the programs of a row block add their parts into y (zeroed first: the input's
        y.zero_()  # preparation stays the kernel right before the GEMV, see pdl_enabled)
    pdl = pdl_enabled(x)
    if late is None:
        late = prepared is None and xq is None and gemv_late(form, bits, mode, packed, pdl)
    if hold is None:
        hold = GEMV_HOLD and bool(late) and _hold_fits(k, bits, tile, split)
    elif hold and not (late and _hold_fits(k, bits, tile, split)):
        raise ValueError(f"hold needs late and rows of at most {HOLD_MAX_TILES} whole word tiles with split 1 "
                         f"(late {late}, {k} columns at {bits} bits, tile {tile} words, split {split})")
    if late and (mode != 5 or form.ku >= bits):
        raise ValueError(f"late serves mode 5 on formats with a transformed factor (mode {mode}, "
                         f"{form.ku} of {bits} bits in the first factor)")
    if late and pdl and prepared is None and (xq is not None or not dct_two_stage(form, bits, True)):
        # only the two-launch preparation holds the GEMV back until x's inputs are written (TRIGGER_LATE); after
        # the other paths' kernels, which let it start at once, its first pass would read them too early
        raise ValueError(f"late under programmatic dependent launch needs the two-launch input preparation "
                         f"(DCT groups of 64 N1 columns, N1 <= 64 or from DCT_LONG_MIN_N1 to DCT_MAX_N1; "
                         f"group {form.group})")
    if prepared is None:
        prepared = prepared_input(x, form, bits, xq, pairs=gemv_pairs(mode), trigger=pdl, share=share,
                                  late=late and pdl)
    xd, xqd, xs, xqs, xp, xqp, sc, qsc, xg = prepared
    if xp is None or xqp is None:
        raise ValueError("the GEMV reads the input's 16-bit pairs: prepare it with pairs=gemv_pairs(mode)")
    sumg = k // xg.shape[1] if mode == 6 and xg is not None and form.group >= k else 0  # sums over parts of a row
    if xg is None:
        xg = xs  # unused by the kernel
    asm = x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    wpg = form.group // (32 // bits)
    gsum5 = bool(GEMV_GROUP_SUMS if group_sums is None else group_sums) and mode == 5 and wpg < tile \
        and tile % wpg == 0
    w = packed.view(torch.int32)
    sym, half, planes = False, False, 0
    if mode == 6:  # scale and offset per (row, group)
        a, bx, sym = affine_args(tables)
        bq = bx
    else:
        a, bx, bq, half = coef_args(form)
        planes = plane_masks(form, bits)
    launch(_gemv_kernel, (_cdiv(m, block_m), split, t),
        w, xs, xqs, xp, xqp, sc, qsc, xg, a, bx, bq, y, ys[1 % len(ys)], ys[-1], m, bounds[0], bounds[1],
        w.stride(0), form.groups, K=k, GROUP=form.group,
        BITS=bits, KU=form.ku, MODE=mode, BLOCK_M=block_m, BLOCK_W=tile, SPLIT=split,
        ASM=asm, XCH=rounding_columns(k, bits), PDL=pdl, NOUT=len(ys), SYM=sym,
        EVICT=GEMV_EVICT if evict is None else evict, UNROLL=unroll, LATE=bool(late), SUMG=sumg,
        GSUM5=gsum5, HALF=half, PLANES=planes, HOLD=bool(hold),
        num_warps=num_warps, **({"launch_pdl": True} if pdl else {}))
    return ys if outputs else y


# The codes' loads are marked first to leave L2: a call reads each code once, and in a model the other layers'
# weights come through L2 before this layer's are read again. H200, weights cycled so that none stays in L2
# (eval/results/kernel_sweeps/sweep_gemv_cold.json): rtn-4 8192x28672 4x1x64 32.9 us against 33.8 without it.
# kashin's GEMV (mode 5) with groups shorter than a word tile: plane dots summed per group, then one coefficient per
# (row, group) (the kernel's GSUM5) instead of BITS + 2 coefficients gathered per word (574 -> 284 sm_90 loop
# instructions at groups of 128, Triton 3.6). H200, whole call, cold L2, versions side by side, three repeats
# (kernel_sweeps/session25/ab_kernels_group_sums_g{128,64}.json), 4096x4096 / 4096x14336 / 14336x4096 / 8192x28672:
# groups of 128 kashin-4 11.9 / 23.6 / 30.3 / 78.7 us against 14.6 / 31.1 / 52.4 / 99.7, kashin-2 8.8 / 14.5 / 17.8
# / 38.4 against 10.9 / 19.3 / 21.7 / 57.8; groups of 64 kashin-4 12.2 / 22.4 / 40.2 / 67.3 against 14.8 / 33.3 /
# 41.6 / 105.4, kashin-2 9.2 / 14.9 / 23.9 / 40.1 against 11.3 / 20.0 / 26.8 / 59.3.
GEMV_GROUP_SUMS = True
GEMV_EVICT = "evict_first"
GEMV_PDL = True  # launch the GEMV with programmatic dependent launch where the GPU has it (see pdl_enabled)


# kashin's GEMV (mode 5) in two passes over the codes (the kernel's LATE) where the input's transform is the
# two-launch one: the first pass (x's planes) runs beside the transform's second launch, the second pass (xq's
# planes) reads the codes again, from L2 on layers whose codes take at most LATE_MAX_BYTES. H200, whole call, cold
# L2, two A/B pairs (eval/results/kernel_sweeps/sweep_gemv_late.json): 4096x4096 kashin-4 10.76 us against 11.25,
# kashin-2 9.38 against 9.86; 4096x14336 kashin-2 (14.7 MB of codes) 15.41 against 16.2, kashin-4 (29.4 MB)
# 25.85 against 23.4 with the eight-row tile; with the two-row tile unrolled (sweep_gemv_late_tiles.json) 21.3-22.1
# against 22.5, kashin-2 14.6 against 14.8, 4096x4096 kashin-4 10.62 against 11.05, kashin-2 9.32 against 9.84
GEMV_LATE = True
LATE_MAX_BYTES = 32 << 20
# With LATE on rows of at most HOLD_MAX_TILES word tiles (4096 columns at 4 bits on the two-row 128-word tile), the
# first pass may keep the row block's codes in registers for the second instead of reading them again from L2 (the
# kernel's HOLD: the K loop unrolled whole; sm_90 code with Triton 3.6, 4096x4096 kashin-4: 128 registers against
# 84, no spills, so 16 one-warp programs an SM, one wave of 2048). Off until timed on the device
# (`bash eval/device_pending.sh hold`).
GEMV_HOLD = False
HOLD_MAX_TILES = 4


def _hold_fits(k: int, bits: int, tile: int, split: int) -> bool:
    """Whether a ``k``-long row of ``bits``-bit codes is at most HOLD_MAX_TILES whole ``tile``-word tiles, unsplit."""
    words = k // (32 // bits)
    return split == 1 and words % tile == 0 and words // tile <= HOLD_MAX_TILES


def gemv_late(form: BitplaneForm, bits: int, mode: int, packed: torch.Tensor, pdl: bool) -> bool:
    """Whether a GEMV call that prepares its own input runs with LATE: :data:`GEMV_LATE`, mode 5 on a format
    with a transformed factor, the two-launch input transform (:func:`dct_two_stage`) under programmatic
    dependent launch (the only case where the transform's last kernel can overlap the GEMV), and codes of at
    most :data:`LATE_MAX_BYTES`."""
    return pdl and mode == 5 and _late_rule(form, bits, packed.numel() * packed.element_size())


def _late_rule(form: BitplaneForm, bits: int, nbytes: int) -> bool:
    return GEMV_LATE and form.ku < bits and dct_two_stage(form, bits, True) and nbytes <= LATE_MAX_BYTES


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether the GEMV for ``x`` is launched with programmatic dependent launch: on CUDA devices of
    compute capability 9.0 (Hopper) and later, unless ``GEMV_PDL`` is off. The GEMV then starts while
    the input's preparation kernel (which signals early) still runs, loads its first codes and waits
    for the prepared input in the kernel: the launch gap and the small preparation kernel overlap
    the weight reads. Correct with any kernel before it: the wait covers whatever ran last."""
    return (GEMV_PDL and x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())[0] >= 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_PREPARED: dict = {}  # the last few-token input's de-interleaved copies, see prepared_input
SHARE_INPUTS = True  # reuse the last input's preparation for the same, unchanged tensor (see prepared_input)
PREP_COLUMNS = 1024  # columns of one token per program of the input-preparation kernels
# The input preparation's Triton kernels are launched with programmatic dependent launch too (when the GEMV is):
# each starts while the kernel before it ends and waits (griddepcontrol.wait) before touching memory, so its
# launch latency hides behind that kernel. H200, cold L2, the module's whole call (kernel_sweeps/
# sweep_gemv_prep_pdl.json): rtn-4 4096x14336 10.73 us against 11.60, 4096x4096 5.2 against 5.8.
PREP_PDL = True
PREP_WARPS = 4  # warps per program of the input-preparation kernel (_prep_kernel)
# Mode 6 at 4 bits on long rows (k >= GEMV_LONG_K, Llama's down projection): the input rounded to 16 bits per
# 2048 columns (one scale each) instead of PREP_COLUMNS, so the long-row tile reads 256 words (16-byte loads of
# one group a thread), and the chunks wider than PREP_COLUMNS prepared by PREP_SPLIT programs each (each reads the
# whole chunk for its maximum). H200, whole call, cold L2, 14336x4096 rtn-4 (kernel_sweeps/sweep_gemv_chunk_split
# .json): 10.98 us at four programs a chunk, 11.13 at two, 11.20 at one, against 12.16-12.18 with 1024-column
# chunks and the 128-word tile (kernel alone 9.60 against 10.96 us); rtn-2 gained nothing (9.77 against 9.60-9.66)
# and neither did the many-row shapes (4096x14336 rtn-4 10.82-11.05 against 10.59-10.63)
ROUNDING_COLUMNS_LONG = {4: 2048}
PREP_SPLIT = 4
# ... and for one group a row, the input summed per SUM_COLUMNS columns there (xg), so that the 256-word tile adds
# integers per part of the row as it does per group (the per-word sums it read before cost it ~1.9 us): 14336x4096
# one scale a row 10.78-10.86 us against 11.88-11.91 at 1024 columns (kernel_sweeps/sweep_gemv_chunk_row_sums.json;
# 12.71-12.94 without the part sums, sweep_gemv_chunk_row.json); the 8B model (one scale a row) generated 409.7
# tokens/s against 401.0 (compiled + CUDA graph, one process each, bench_generate_ab_chunk{2048_sums,1024_b}.md)
SUM_COLUMNS = 64
# Whether mode 6's preparation also writes the float32 de-interleaved input: mode 6 never reads it, so False
# (prepared_input's xd left unwritten for mode 6). H200, whole call, cold L2 (kernel_sweeps/sweep_gemv_mode7.json):
# 0.1-0.6 us less on 7 of the 8 rtn cases (rtn-4 4096x14336 10.49 against 10.76 us, rtn-2 14336x4096 9.88 against
# 10.50), 14336x4096 rtn-4 within noise (12.24 against 12.09)
PREP_XD = False


def rounding_columns(k: int, bits: int) -> int:
    """Columns per scale of mode 6's 16-bit input (the chunk of the input's rounding) for a ``k``-wide input of a
    layer with ``bits``-bit codes: :data:`ROUNDING_COLUMNS_LONG` on long rows, else :func:`prep_columns`."""
    if k >= GEMV_LONG_K and bits in ROUNDING_COLUMNS_LONG:
        return min(ROUNDING_COLUMNS_LONG[bits], _pow2(k))
    return prep_columns(k, 32 // bits)


def prep_columns(k: int, per: int) -> int:
    """Columns per program of the input-preparation kernels (and per scale of mode 6's chunk-scaled
    16-bit inputs) for a ``k``-wide input with ``per`` codes a word."""
    return min(PREP_COLUMNS, max(_pow2(k), per))


# kashin's input preparation for the GEMV (mode 5) in two launches where the DCT length splits as N1 x N2
# (dft_split): prep + FFT stage one, then stage two + DCT + 16-bit pairs, instead of prep, cuFFT's rfft, post and
# pairs (four launches and cuFFT's own). False: the rfft path (kept for other lengths and for comparison).
DCT_TWO_STAGE = True
DCT_DOT_PRECISION = "tf32x3"  # tl.dot's precision for the DFT stages: float32 accuracy from the tensor cores
DCT_WARPS = (4, 4)  # warps per program of the two launches
# Stage two's outputs per program: 16 k1 by this many k2 (16, 32 or 64). H200, K = 4096, the two launches alone
# (kernel_sweeps/sweep_prep_dct_k2.json): 4.53 us at 32 against 4.93 at 16 and 5.73 at 64 with DCT_WARPS (4, 4)
# (stage two 2.62 against 3.12 and 4.03 us); with 2 warps in stage two 64 spilled (70 us)
DCT_STAGE2_K2 = 32
# The first factors N1 the two launches take (dft_split): up to 64 (4096-wide groups and shorter), and from
# DCT_LONG_MIN_N1 to DCT_MAX_N1 (at most 256), where stage two runs its product in DCT_STAGE2_CHUNK-row steps of A.
# H200, twenty-fourth session (kernel_sweeps/long_dct/): the preparation alone 10.8 against the rfft path's 12.2 us
# at 14336 (224 x 64), 11.9 against 14.4 at 11008 (172 x 64), 7.7 against 8.4 at 8192 (128 x 64); whole calls, the
# versions side by side: 14336x4096 kashin-4 23.6-24.3 against 27.9-28.1 us, kashin-2 20.9-21.0 against 23.4, but
# 8192x28672 kashin-4 73.4 against 68.8 (kashin-2 38.5 against 39.3-40.2), so 8192 stays on the rfft path. (The
# single-step stage two at N1 = 112 spilled and lost to the rfft path: 14.1 against 12.7 us at 14336.)
DCT_MAX_N1 = 256
DCT_LONG_MIN_N1 = 129
DCT_STAGE2_CHUNK = 64  # rows of A (of 2 N1P) per step of stage two's product when 2 N1P is longer


def dft_split(g: int) -> tuple[int, int] | None:
    """``(N1, 64)`` with ``g = 64 N1`` and N1 <= 64 or from :data:`DCT_LONG_MIN_N1` to :data:`DCT_MAX_N1` (at
    most 256), for the two-launch DCT of a ``g``-long group (4096 = 64 x 64, 576 = 9 x 64, 1536 = 24 x 64), or
    None (the rfft path). Measured on the H200 (eval/results/kernel_sweeps/sweep_prep_dct*.json,
    bench_kernels_kashin.md): at 4096 the two
    launches take 4.9-5.0 us against the rfft path's 7.2 in the same run; with N1 = 112 or 128 (14336 = 112 x
    128, 8192 = 128 x 64) stage two's products in one step made them slower than it (14.1 against 12.7 us at
    14336: compiled for sm_90, stage two with N1 = 112 kept 3.8-5.5 KB a thread on the stack, python -m
    eval.sass_gemv --kernel _dct_stage2_kernel), hence the steps (:data:`DCT_STAGE2_CHUNK`) past 64."""
    n1 = g // 64
    if g % 64 == 0 and (n1 <= 64 or DCT_LONG_MIN_N1 <= n1 <= min(DCT_MAX_N1, 256)):
        return n1, 64
    return None


def stage2_chunk(n1p: int) -> int:
    """Stage two's RCH for an N1P-row first factor: 0 (one step, the tables before the wait) up to N1P = 64,
    else :data:`DCT_STAGE2_CHUNK` rows (at most N1P, so that a step stays in one plane of A)."""
    return 0 if 2 * n1p <= 128 else min(DCT_STAGE2_CHUNK, n1p)


@functools.lru_cache(maxsize=32)
def dft_tables(g: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """The two-launch DCT's constants for a ``g``-long group, float32, the DFT matrices split into tf32 part and
    remainder (:func:`tf32_split`, the leading axis): ``f2`` (2, N2, 2 N2) the N2-point DFT matrix ``w_N2^(n2
    k2)``, column ``2 k2`` its real and ``2 k2 + 1`` its imaginary part; ``tw`` (2, N1P,
    N2) the twiddles ``w_G^(n1 k2)`` (real plane, then imaginary); ``f1`` (2, 2, N1P, 2 N1P) the N1-point DFT
    matrix ``F = w_N1^(k1 n1)`` as ``[Re F, -Im F]`` and ``[Im F, Re F]``, so that one real product with A's
    two planes stacked gives each part of ``F A``. Rows and columns past N1 are zero (N1P: N1 rounded up to
    a power of two >= 16, ``tl.dot``'s shapes). Returns (f2, tw, f1, N1, N1P, N2). Angles from exact integer
    products modulo the length, in float64."""
    n1, n2 = dft_split(g)
    n1p = max(16, _pow2(n1))

    def plane(num: torch.Tensor, length: int) -> torch.Tensor:
        angle = -2 * torch.pi * (num % length).double() / length
        return torch.stack((torch.cos(angle), torch.sin(angle))).float()

    i2 = torch.arange(n2)
    f2 = plane(i2[:, None] * i2[None, :], n2).permute(1, 2, 0).reshape(n2, 2 * n2)
    tw = plane(torch.arange(n1p)[:, None] * i2[None, :], g)
    tw[:, n1:] = 0
    i1 = torch.arange(n1p)
    f_re, f_im = plane(i1[:, None] * i1[None, :], n1)
    f_re[n1:], f_im[n1:], f_re[:, n1:], f_im[:, n1:] = 0, 0, 0, 0
    f1 = torch.stack((torch.cat((f_re, -f_im), dim=1), torch.cat((f_im, f_re), dim=1)))
    f2, f1 = tf32_split(f2), tf32_split(f1)
    return (*(t.contiguous().to(device) for t in (f2, tw, f1)), n1, n1p, n2)


def tf32_split(t: torch.Tensor) -> torch.Tensor:
    """``stack((hi, lo))``: float32 ``t`` as its tf32 part (10 mantissa bits, the low 13 zeroed) and the exact
    float32 remainder, so that tf32 tensor-core products of both recover float32 accuracy (:func:`_dot3`)."""
    hi = (t.view(torch.int32) & -8192).view(torch.float32)
    return torch.stack((hi, t - hi))


def dct_two_stage(form: BitplaneForm, bits: int, pairs: bool | str) -> bool:
    """Whether :func:`prepared_input` prepares this kashin input in the two launches (:data:`DCT_TWO_STAGE`):
    DCT groups that :func:`dft_split` splits, and mode 5's 16-bit pairs asked for."""
    return (DCT_TWO_STAGE and pairs is True and form.ku < bits and form.transform == "dct"
            and dft_split(form.group) is not None)


def _two_stage_input(x: torch.Tensor, form: BitplaneForm, bits: int, trigger: bool, chain: bool,
                     launches: tuple[bool, bool] = (True, True), late: bool = False):
    """:func:`prepared_input`'s tuple for a kashin input through :func:`_dct_stage1_kernel` and
    :func:`_dct_stage2_kernel` (the transformed input's scale: a bound, see there). ``launches``: which of
    the two run (eval/sweep_prep_dct.py times each alone; the outputs of one left out are not written).
    ``late``: the second launch lets the next kernel start only after its own wait for the first
    (TRIGGER_LATE), for a GEMV with LATE."""
    t, k = x.shape
    per, g = 32 // bits, form.group
    f2, tw, f1, n1, n1p, n2 = dft_tables(g, x.device)
    dev = x.device
    xd, xqd = (torch.empty(t, per, k // per, device=dev, dtype=torch.float32) for _ in range(2))
    xs, xqs = (torch.empty(t, k // per, device=dev, dtype=torch.float32) for _ in range(2))
    xp, xqp = (torch.empty(t, 8 // bits, 2, k // per, device=dev, dtype=torch.int32) for _ in range(2))
    sc, qsc = (torch.empty(t, device=dev, dtype=torch.float32) for _ in range(2))
    spectrum = torch.empty(t, k // g, 2, n1p, n2, device=dev, dtype=torch.float32)
    energy = torch.empty(t, k // g, n1p // 16, n2, device=dev, dtype=torch.float32)
    signs = random_signs(g, form.seed, device=dev, dtype=torch.float32)
    ch = prep_columns(k, per)
    stage1 = (k // g) * (n1p // 16) * (n2 // 32)
    pdl = {"launch_pdl": True} if chain else {}
    if launches[0]:
        launch(_dct_stage1_kernel, (t, stage1 + _cdiv(k, ch)),
            x, xd, xs, xp.view(torch.int16), sc, energy, signs, f2, tw, spectrum, K=k, G=g, N1=n1, N1P=n1p,
            N2=n2, PER=per, CH=ch, RED=min(4096, _pow2(k)), PRECISION=DCT_DOT_PRECISION,
            TRIGGER=chain, WAIT=chain, num_warps=DCT_WARPS[0], **pdl)
    if launches[1]:
        twiddle = torch.view_as_real(dct_twiddle(g, dev, torch.float32))
        bk2 = max(min(DCT_STAGE2_K2, n2), per)
        launch(_dct_stage2_kernel, (t, (k // g) * (n2 // bk2) * (n1p // 16)),
            spectrum, f1, twiddle, energy, xqd, xqs, xqp.view(torch.int16), qsc, K=k, G=g, N1=n1, N1P=n1p, N2=n2,
            PER=per, NGP=_pow2(k // g), PRECISION=DCT_DOT_PRECISION, TRIGGER=trigger, WAIT=chain,
            BK2=bk2, TRIGGER_LATE=late, RCH=stage2_chunk(n1p), num_warps=DCT_WARPS[1], **pdl)
    return xd, xqd, xs, xqs, xp, xqp, sc, qsc, None


def quantized_pairs(xd: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The de-interleaved input ``xd`` ``(T, PER, NW)`` rounded to 16 bits per token for GEMV mode 5:
    ``(pairs, scale)``, ``scale = max|x| / 32767`` per token unless given (values beyond ``32767 scale``
    saturate) and ``pairs`` int32 ``(T, CPB, 2, NW)``
    (CPB = 8 / bits codes per byte) holding two int16 values: ``[t, k, h, w]`` has the codes at
    positions ``k + 2h CPB`` (low half) and ``k + (2h + 1) CPB`` (high half) of word ``w``, the codes
    whose bits one shift and mask put into bytes 2h and 2h + 1 of a register."""
    cpb = 8 // bits
    if scale is None:
        scale = xd.abs().amax(dim=(1, 2)).clamp(min=1e-30) / 32767
    q = torch.round(xd / scale[:, None, None]).clamp(-32767, 32767).to(torch.int32)
    k = torch.arange(cpb, device=xd.device)
    lo = torch.stack([k, k + 2 * cpb], dim=1)  # (CPB, 2): positions for h = 0, 1
    pairs = (q[:, lo] & 0xFFFF) | (q[:, lo + cpb] << 16)
    return pairs.contiguous(), scale.contiguous()


def prepared_input(x: torch.Tensor, form: BitplaneForm, bits: int, xq: torch.Tensor | None = None,
                   pairs: bool | str = False, trigger: bool = False, share: bool = True, late: bool = False):
    """``(xd, xqd, xs, xqs, xp, xqp, sc, qsc, xg)``: the float32 input and transformed input the GEMV kernel
    reads, de-interleaved (``(T, PER, K / PER)``, see :func:`deinterleave`) and summed per 32-bit word
    of codes (``(T, K / PER)``); with ``pairs`` also both rounded to 16 bits (:func:`quantized_pairs`;
    ``True``: one scale per token for mode 5, ``"chunk"``: one per :func:`rounding_columns` columns for
    mode 6, ``sc`` then ``(T, chunks)``, and ``xd``/``xs`` then hold the rounded input), else None
    there; ``xg``: with ``"chunk"``, the rounded input's sums over each group of ``form.group`` columns
    when a group is shorter than the row, or over :data:`SUM_COLUMNS`-column parts of a row-long group where the
    chunks are wider than :data:`PREP_COLUMNS`, else None.

    Layers that take the same input tensor (q/k/v, gate/up) share one transform: the last input is
    kept (a reference, so its memory cannot be reused by another tensor while cached) with its
    version counter, and reused while neither changes. ``xq`` given: no caching. A write that bypasses
    the version counter (through ``.data`` or a DLPack alias) is not seen: set ``SHARE_INPUTS = False``
    where a program writes its inputs that way, and ``share=False`` for inputs whose memory is written
    without it (torch.compile's generated kernels: see ``quantune.qlinear``'s custom op). ``trigger``: the last kernel lets a GEMV launched with
    programmatic dependent launch start early (:func:`pdl_enabled`), and with :data:`PREP_PDL` the
    preparation's own kernels are launched that way too, each waiting for the kernel before it. ``late``: for
    a GEMV with LATE (:func:`gemv_late`), which reads x's inputs at its start: the two-launch preparation then
    lets it start only after the first launch has finished (part of the sharing key, so such a GEMV never
    reuses a preparation made without it)."""
    if triton is None:
        raise RuntimeError("the fused kernel needs triton")
    if x.shape[0] > MAX_TOKENS:
        raise ValueError(f"the fused kernel serves at most {MAX_TOKENS} tokens, got {x.shape[0]}")
    if pairs not in (False, True, "chunk"):
        raise ValueError(f"pairs must be False, True (one scale per token) or 'chunk', not {pairs!r}")
    needs_xq, given = form.ku < bits, xq is not None
    chunked = pairs == "chunk"
    if chunked and needs_xq:
        raise ValueError("chunk-scaled pairs (GEMV mode 6) serve formats without a transformed factor (rtn)")
    two_stage = not given and dct_two_stage(form, bits, pairs)
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version, bits, pairs,
           form.transform if needs_xq else None, form.seed if needs_xq else None,
           form.group if needs_xq or chunked else None, two_stage, late and two_stage)
    share = share and not given and SHARE_INPUTS
    if share:
        hit = _PREPARED.get("entry")
        if hit is not None and hit[0] == key:
            return hit[2]
    chain = trigger and PREP_PDL  # the preparation's own kernels launched with programmatic dependent launch
    if two_stage:
        prepared = _two_stage_input(x.contiguous(), form, bits, trigger, chain, late=late)
        if share:
            _PREPARED["entry"] = (key, x, prepared)
        return prepared
    t, k = x.shape
    per = 32 // bits
    xd = torch.empty(t, per, k // per, device=x.device, dtype=torch.float32)
    xs = torch.empty(t, k // per, device=x.device, dtype=torch.float32)
    fused_dct = needs_xq and not given and form.transform == "dct"
    logb = hadamard_log_block(form) if needs_xq and not given else 0  # the Hadamard transform in the kernel
    fused_pairs = pairs is True and (fused_dct or logb > 0 or not needs_xq)  # both inputs' pairs from the kernels
    g = form.group if fused_dct or logb else k
    ch = xch = rounding_columns(k, bits) if chunked else max(prep_columns(k, per), 1 << logb)
    if chunked and xch > PREP_COLUMNS:  # PREP_SPLIT programs share each chunk's scale, unless that would cut
        ch = max(xch // PREP_SPLIT, per)  # a group's sum
        if form.group < k and xch % form.group == 0 and ch % form.group:
            ch = xch
    grid = (t, _cdiv(k, ch))
    x = x.contiguous()
    v = torch.empty(t, k, device=x.device, dtype=torch.float32) if fused_dct else xd
    signs = random_signs(g, form.seed, device=x.device, dtype=torch.float32) if fused_dct or logb else xd
    xqd, xqs = (torch.empty_like(xd), torch.empty_like(xs)) if logb else (xd, xs)
    amax = torch.empty(t, 2, grid[1], device=x.device, dtype=torch.float32) if fused_pairs else xd  # per chunk
    xp = torch.empty(t, 8 // bits, 2, k // per, device=x.device, dtype=torch.int32) if chunked or fused_pairs else None
    xqp = sc = qsc = xg = None
    gs = 0
    if chunked:  # mode 6: each chunk of xch columns rounded with its own scale
        sc = torch.empty(t, _cdiv(k, xch), device=x.device, dtype=torch.float32)
        if form.group < k and ch % form.group == 0:  # sums per group, for tiles across groups (or chunks)
            gs = form.group
        elif form.group >= k and xch > PREP_COLUMNS and ch % SUM_COLUMNS == 0:  # one group a row, wide chunks:
            gs = SUM_COLUMNS  # sums over parts of the row, so that long tiles add integers per part
        if gs:
            xg = torch.empty(t, k // gs, device=x.device, dtype=torch.float32)
    launch(_prep_kernel, grid, x, xd, xs, signs, v, amax, xp.view(torch.int16) if chunked else xd,
           sc if chunked else xd, xd if xg is None else xg, xqd, xqs, K=k, G=g, PER=per, HAS_V=fused_dct,
           PAIRS=2 if chunked else int(fused_pairs), CH=ch, GS=gs,
           TRIGGER=trigger and (not needs_xq or logb > 0) and not (pairs is True and not fused_pairs),
           WAIT=chain, XD=PREP_XD or not chunked, SCH=xch if chunked else 0, LOGB=logb,
           num_warps=hadamard_warps(ch) if logb else PREP_WARPS,
           **({"launch_pdl": True} if chain else {}))
    if fused_dct:  # cast, de-interleave and DCT pre-step in one kernel, then one rfft and one post kernel
        spectrum = torch.view_as_real(torch.fft.rfft(v.view(t * (k // g), g), dim=-1))
        twiddle = torch.view_as_real(dct_twiddle(g, x.device, torch.float32))
        xqd, xqs = torch.empty_like(xd), torch.empty_like(xs)
        launch(_dct_post_kernel, grid, spectrum, twiddle, xqd, xqs, amax, K=k, G=g, PER=per, PAIRS=fused_pairs, CH=ch,
               TRIGGER=chain, WAIT=chain, **({"launch_pdl": True} if chain else {}))
    elif needs_xq and not logb:
        xq = transformed_input(x.float(), form) if xq is None else xq
        xqd = deinterleave(xq.float(), bits)
        xqs = xqd.sum(1)
    if chunked:
        xqp, qsc = xp, sc
    if fused_pairs:
        sc = torch.empty(t, device=x.device, dtype=torch.float32)
        xqp, qsc = (torch.empty_like(xp), torch.empty_like(sc)) if needs_xq else (xp, sc)
        launch(_pairs_kernel, grid, xd, xqd, amax, xp.view(torch.int16), xqp.view(torch.int16), sc, qsc, K=k, PER=per,
               HAS_Q=needs_xq, CH=ch, NCH=_pow2(grid[1]), TRIGGER=trigger,
               WAIT=chain, **({"launch_pdl": True} if chain else {}))
    if pairs is True and xp is None:  # not fused above: torch
        xp, sc = quantized_pairs(xd, bits)
    if pairs is True and xqp is None:
        xqp, qsc = quantized_pairs(xqd, bits) if needs_xq else (xp, sc)
    prepared = (xd, xqd, xs, xqs, xp, xqp, sc, qsc, xg)
    if share:
        _PREPARED["entry"] = (key, x, prepared)
    return prepared


# The GEMV kernel's set-up per format: (rows per program, warps, words per tile) and the number of
# programs a row block is split into along K, enough to fill the GPU. From the H200 sweeps
# (eval/results/bench_kernels.md, kernel_sweeps/): the best or within 10% of it on every measured shape.
# Candidates in order: the first that gives at least GEMV_MIN_WARPS warps in all is taken, else the last
# (one-warp programs over 128-word tiles keep 4 x 16 bytes of codes in flight per thread; layers with
# few rows need smaller row blocks to fill the GPU: 14336x4096 kashin-4 16.1 us at 2x1x128 vs 23.4 at 8x2x128).
# kashin (int16 dot products, mode 5; plane sums): two rows per one-warp program on every shape. Whole call, cold L2
# (kernel_sweeps/sweep_gemv_kashin_wide_tiles.json, sweep_gemv_late3.json: one pass): 4096x14336 kashin-4 22.73 us
# (unrolled twice) against 23.66 at 8x2x128, kashin-2 14.78 against 16.22; 8192x28672 kashin-2 41.75 against 48.3,
# kashin-4 64.5 against 64.3 (within noise)
GEMV_TILES = ((2, 1, 128),)
# rtn: codes as int16 dot products (mode 6); many rows: 4 x 64 words (cold L2, rtn-4 4096x14336 9.8 us against
# 10.6 at 4 x 128, kernel_sweeps/sweep_gemv_cold.json), plain at 4 bits: the prefetching, unrolled tile measured
# faster alone (kernel_sweeps/sweep_gemv_unroll.json, 4096x14336 9.47 us against 9.78, 8192x28672 31.09 against
# 32.41) but slower in the 8B model's generation, where the layers run back to back (bench_generate_ab_*.json,
# compiled + CUDA graph: 380.4 and 380.7 tokens/s with it, 392.0 with only this tile plain, 399.3 and 399.7 plain
# with the long rows rolled too)
GEMV_TILES_AFFINE = ((4, 1, 64), (2, 1, 128))
GEMV_MIN_WARPS = 2048
# rtn at 2 bits takes the same tiles, rolled, since the sixteenth session's sweep (H200, whole call, cold L2, one run,
# kernel_sweeps/sweep_gemv_2bit_noprefetch{,_row}.json, groups of 64 / one scale a row): 4096x14336 8.63 / 7.57 us
# against 9.91 / 9.19 for the 4 x 64 tile prefetching the next tile's codes and unrolled twice, which had measured
# faster sessions before (sweep_gemv_prefetch_cold.json); 8192x28672 24.50 / 21.03 against 26.01 / 21.64 for the two
# rows over two input chunks (span) unrolled twice (sweep_gemv_span3.json), in that run.
# ... except on very many rows with groups shorter than the row (the acceptance benchmark's groups of 64): two rows
# per one-warp program over 128 words, two chunks of the input's rounding (gemv_matmul's span), unrolled twice, with
# the kernel's K part read from the grid there: 8192x28672 rtn-2 23.10-23.21 us against 24.54-24.65 for the 4 x 64
# tile (kernel_sweeps/ab_kernels_part_tiles.json, versions side by side, one run); with one scale a row the 4 x 64
# tile stays (21.02 against 22.47-22.54, ab_kernels_part_tiles_row.json).
GEMV_MANY_ROWS_2BIT = 16384
# rtn at 4 bits on very many rows that are long or grouped: eight rows per one-warp program over 64 words. Whole
# call, cold L2, two pairs alternating in one run (kernel_sweeps/sweep_gemv_8rows{,_first}_{g64,row}.json, groups of
# 64 / one scale a row): 8192x28672 32.19 / 29.83 us against 33.35 / 32.08 for 4 x 64; 4096x28672 with groups of 64
# 17.46 against 18.62, but with one scale a row 20.4 against 17.8 (so not there: the 8B model's joined gate/up);
# 4096x16384 12.67 / 11.6 against 11.75 / 10.97 and 4096x14336 11.75 against 10.7 (so not below the threshold, set
# between the 16384 rows that lost and the 28672 that won). bench_kernels.md: 8192x28672 rtn-4 32.5 us, 3.39x bf16.
GEMV_VERY_MANY_ROWS = 24576
GEMV_TILE_VERY_MANY_ROWS = (8, 1, 64)
GEMV_TILE_2BIT_SPAN = (2, 1, 128)
GEMV_UNROLL_2BIT_SPAN = 2
# rtn, long rows and few of them (Llama's down projection, 14336 -> 4096): one row per warp. Cold L2, rtn-4
# 14336x4096: 10.9-11.0 us against 11.8 at 2 x 1 x 128 (kernel_sweeps/sweep_gemv_cold, _prefetch_cold); rtn-2 1%.
GEMV_LONG_K = 8192
GEMV_TILE_LONG_ROWS = (1, 1, 128)
# ... over 256 words where the input's rounding chunk holds that many (ROUNDING_COLUMNS_LONG: 4 bits): 14336x4096
# rtn-4 whole call 10.98-11.20 us against 12.16-12.38 for 128 words (kernel_sweeps/sweep_gemv_chunk_split.json)
GEMV_TILE_LONG_ROWS_WIDE = (1, 1, 256)
GEMV_MIN_PROGRAMS = 512
# The K loop's unroll factor (fewer address and loop instructions per tile: 74 -> 64 per 32 weights and thread in the
# one-row loop at 4 bits, read in the sm_90 code) for rtn's long-row tile, by bits. kernel_sweeps/sweep_gemv_unroll.json (cold L2, kernel alone): 14336x4096 rtn-2 8.55 us against
# 10.26; rtn-2 4x1x64p 4096x14336 7.33 against 7.46, 8192x28672 21.36 against 22.19. At 4 bits the long-row tile stays
# rolled: unrolled 4x it measured 10.30 against 10.99 us alone, but the 8B model generated slower with it
# (bench_generate_ab_long-old.json: 387.7 tokens/s rolled against 380.4-380.7 unrolled, with the many-row tile
# prefetching in both). rtn's other tiles stay rolled (its two-row tiles were slower unrolled; the prefetching tile
# that was unrolled twice is gone with prefetching).
GEMV_UNROLL_LONG_ROWS = {2: 2}
# kashin's two-row tile (mode 5) unrolled twice on long rows (few of them) and at 2 bits. H200, whole call, cold L2,
# three A/B pairs in one run (kernel_sweeps/sweep_gemv_kashin_unroll.json): 14336x4096 kashin-4 27.7-29.0 us against
# 29.0-30.1, kashin-2 25.1 against 27.7-27.9; 4096x4096 kashin-2 9.8 against 10.1; many rows
# (sweep_gemv_kashin_wide_tiles.json, sweep_gemv_late3.json): 4096x14336 kashin-4 22.73 against 23.24; at 4 bits
# on short rows, few of them, it lost (4096x4096 kashin-4 12.3 against 11.0-11.2; 12.44 against 11.19), so it
# stays rolled there. At 4 bits on many rows it stays rolled too: in two bench runs the rolled tile's whole call
# beat the library's unrolled one (bench_kernels.json, 'decode_s' against 'decode_library_s': 4096x14336 20.5 /
# 21.3 us against 22.1 / 22.0, 8192x28672 61.1 / 60.4 against 64.4 / 63.6), and versions side by side in one process
# (kernel_sweeps/ab_kernels_kashin_unroll.json): 4096x14336 20.2-21.0 against 21.2-21.9, 8192x28672 60.5 against 64.0,
# 4096x28672 34.4 against 35.6
GEMV_UNROLL_KASHIN = 2


def gemv_tile(m: int, affine: bool, k: int | None = None, bits: int | None = None,
              group: int | None = None) -> tuple[int, int, int]:
    """(rows per program, warps, words per tile) of the GEMV for a ``m``-row layer of ``k``
    columns (``k`` None: as for short rows), ``bits``-bit codes and ``group``-column groups (None: one a row)."""
    if _span_rule(m, affine, bits, k, group):
        return GEMV_TILE_2BIT_SPAN
    if (affine and bits == 4 and m >= GEMV_VERY_MANY_ROWS and k is not None
            and (k >= GEMV_LONG_K or (group is not None and group < k))):
        return GEMV_TILE_VERY_MANY_ROWS
    if affine and k is not None and k >= GEMV_LONG_K and GEMV_MIN_WARPS <= m < GEMV_LONG_K:
        wide = bits is not None and 32 % bits == 0 and rounding_columns(k, bits) // (32 // bits) >= 256
        return GEMV_TILE_LONG_ROWS_WIDE if wide else GEMV_TILE_LONG_ROWS
    tiles = GEMV_TILES_AFFINE if affine else GEMV_TILES
    for tile in tiles:
        if -(-m // tile[0]) * tile[1] >= GEMV_MIN_WARPS:
            return tile
    return tiles[-1]


def gemv_unroll(tile: tuple[int, int, int], affine: bool, bits: int, k: int | None = None,
                m: int | None = None, group: int | None = None) -> int:
    """The K loop's unroll factor for a layer's :func:`gemv_tile` (1: rolled); ``k``: the row length, ``m``: the
    rows (None: as for short rows, few of them), ``group``: as for gemv_tile."""
    if tile == GEMV_TILE_2BIT_SPAN and _span_rule(m, affine, bits, k, group):
        return GEMV_UNROLL_2BIT_SPAN
    if not affine:
        long_rows = k is not None and k >= GEMV_LONG_K and (m is None or m < GEMV_LONG_K)
        return GEMV_UNROLL_KASHIN if tile == GEMV_TILES[-1] and (long_rows or bits == 2) else 1
    if tile in (GEMV_TILE_LONG_ROWS, GEMV_TILE_LONG_ROWS_WIDE):
        return GEMV_UNROLL_LONG_ROWS.get(bits, 1)
    return 1


def gemv_span(m: int | None, affine: bool, bits: int | None, k: int | None, group: int | None) -> bool:
    """Whether a layer's GEMV tile covers two chunks of the input's 16-bit rounding (mode 6, :func:`gemv_matmul`'s
    ``span``): rtn at 2 bits, very many rows, groups shorter than the row (:data:`GEMV_MANY_ROWS_2BIT`)."""
    return _span_rule(m, affine, bits, k, group)


def _span_rule(m: int | None, affine: bool, bits: int | None, k: int | None, group: int | None) -> bool:
    # gemv_tile and gemv_unroll read the rule here, so that a sweep replacing gemv_span (eval/sweep_gemv.py --span)
    # changes only whether the tile spans, not which tile the layer gets
    return (affine and bits == 2 and m is not None and m >= GEMV_MANY_ROWS_2BIT and k is not None
            and group is not None and group < k)


def gemv_split(m: int, form: BitplaneForm, bits: int, block_m: int, block_w: int) -> int:
    """The K split (1 or 2) of a ``m``-row layer: 2 when one program per row block leaves fewer than
    GEMV_MIN_PROGRAMS programs and the row length allows it. Never more than two: two partial sums
    added atomically into zero give the same float whichever lands first (``0 + a + b == 0 + b + a``),
    so results stay bitwise reproducible; three or more would not be."""
    blocks = -(-m // block_m)
    if blocks < GEMV_MIN_PROGRAMS and gemv_block_w(form, bits, block_w, 2) is not None:
        return 2
    return 1


def fused_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int,
                 tables: tuple | None, out_dtype: torch.dtype = torch.float32, share: bool = True,
                 outputs: tuple[int, ...] | None = None) -> torch.Tensor | list[torch.Tensor] | None:
    """The few-token kernel for this format: the word-reading GEMV where codes fill whole 32-bit
    words (1, 2, 4, 8 bits), else the bit-plane kernel for kashin at <= 2 bits and the level-table
    kernel otherwise (the fastest of those two on the H200, eval/results/bench_kernels.md).
    ``out_dtype``: the GEMV stores its result in it (float32 sums, one rounding); the others return
    float32. ``share``: let layers that take the same input tensor share its preparation
    (:func:`prepared_input`). ``outputs``: row counts of layers stored back to back (see
    :func:`gemv_matmul`): one launch and a list of results, or None where no one-launch kernel
    serves them (the caller then runs the layers one by one); never split along K."""
    if gemv_supported(form, bits, packed.shape[1]):
        affine = tables[2] if tables is not None else level_tables(form, bits)[2]
        tile = gemv_tile(packed.shape[0], affine, x.shape[1], bits, form.group)
        block_m, warps, block_w = tile
        unroll = gemv_unroll(tile, affine, bits, x.shape[1], packed.shape[0], form.group)
        # layers launched together keep their rows whole (split 1): results are stored per layer
        split = gemv_split(packed.shape[0], form, bits, block_m, block_w) if outputs is None else 1
        return gemv_matmul(x, packed, form, bits, block_m=block_m, block_w=block_w, num_warps=warps, split=split,
                           affine=affine, tables=tables, out_dtype=out_dtype, share=share,
                           outputs=outputs, unroll=unroll,
                           span=gemv_span(packed.shape[0], affine, bits, x.shape[1], form.group))
    if outputs is not None:
        return None
    if form.transform is not None and bits <= 2:
        return bitplane_matmul(x, packed, form, bits, block_m=4, num_warps=1)
    return levels_matmul(x, packed, form, bits, tables=tables, block_m=2, num_warps=1)
