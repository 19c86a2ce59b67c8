"""Fused low-bit matmul for few tokens (decode): read packed codes once, never build a weight.

Both formats decode linearly in the bits of their codes (:class:`quantune.methods.BitplaneForm`),
so ``y = x W^T`` is, per output row, ``bits`` dot products of 0/1 bit planes with ``x`` (or with
``xq = Q^T x`` per group, for kashin's transformed factor), combined with per-group
coefficients: the kernel streams the packed bytes (bits/8 bytes per weight instead of 2 for
bf16) and keeps ``bits`` accumulators in registers. ``xq`` costs one fast transform of the
activations, not of the weights.

:func:`bitplane_matmul_reference` is the same math in plain torch (CPU, tests);
:func:`bitplane_matmul` runs the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1`` for
correctness checks). :class:`~quantune.qlinear.QuantLinear` uses the kernel on CUDA for inputs of at
most ``MAX_TOKENS`` tokens and the decode-then-GEMM path otherwise.
"""
from __future__ import annotations

import torch

from quantune.methods import BitplaneForm
from quantune.transforms import forward_transform

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
    m, groups = form.bx.shape
    xq = transformed_input(x, form).float()
    planes = bit_planes(packed, bits, k).reshape(bits, m, groups, form.group)
    xg, xqg = x.reshape(t, groups, form.group), xq.reshape(t, groups, form.group)
    y = torch.einsum("mg,tg->tm", form.bx, xg.sum(-1)) + torch.einsum("mg,tg->tm", form.bq, xqg.sum(-1))
    for plane in range(bits):
        src = xg if plane < form.ku else xqg
        dots = torch.einsum("mgk,tgk->tmg", planes[plane], src)
        y = y + (dots * form.a[..., plane]).sum(-1)
    return y


def level_tables(form: BitplaneForm, bits: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per (row, group): the values each factor's code field decodes to.

    ``lut_u[r, g, j] = bx + sum_{t < ku} a_t bit_t(j)`` (``2**ku`` entries) and likewise
    ``lut_v`` over the high ``bits - ku`` bits with ``bq``. When every ``a_t = a_0 2^t`` (rtn's
    uniform grid) the u value is affine in the code and no table is needed: returns
    ``(bx, a_0, True)`` instead."""
    a = form.a.float()
    ku, kv = form.ku, bits - form.ku
    powers = 2.0 ** torch.arange(ku, device=a.device)
    if kv == 0 and torch.allclose(a[..., :ku], a[..., :1] * powers, rtol=1e-6, atol=0):
        return form.bx.float().contiguous(), a[..., 0].contiguous(), True

    def table(coeffs, offset, k):
        j = torch.arange(1 << k, device=a.device)
        b = ((j[:, None] >> torch.arange(k, device=a.device)) & 1).float()  # (2^k, k)
        return (offset[..., None] + coeffs @ b.T).contiguous()

    lut_u = table(a[..., :ku], form.bx.float(), ku)
    lut_v = table(a[..., ku:], form.bq.float(), kv) if kv else torch.zeros_like(form.bq.float())[..., None]
    return lut_u, lut_v, False


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
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
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
                u = tl.load(lu_ptr + coef, mask=rmask, other=0.0)[:, None] + \
                    tl.load(lv_ptr + coef, mask=rmask, other=0.0)[:, None] * code.to(tl.float32)
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
    def _levels_words_kernel(words_ptr, x_ptr, xq_ptr, lu_ptr, lv_ptr, y_ptr,
                             M, stride_words, groups, group, K: tl.constexpr,
                             BITS: tl.constexpr, KU: tl.constexpr, AFFINE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
        """The level-table kernel reading the codes as 32-bit words (32 / BITS codes per load
        instead of one byte per code); the tile is (rows, words, codes in a word), so no reshape."""
        PER: tl.constexpr = 32 // BITS
        pid_m = tl.program_id(0)
        tok = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        sub = tl.arange(0, PER)
        acc = tl.zeros([BLOCK_M, BLOCK_W, PER], dtype=tl.float32)
        for w0 in range(0, K // PER, BLOCK_W):
            widx = w0 + tl.arange(0, BLOCK_W)
            word = tl.load(words_ptr + rows[:, None] * stride_words + widx[None, :], mask=rmask[:, None], other=0)
            code = (word[:, :, None] >> (sub[None, None, :] * BITS)) & ((1 << BITS) - 1)
            cols = widx[:, None] * PER + sub[None, :]
            x = tl.load(x_ptr + tok * K + cols).to(tl.float32)
            coef = rows * groups + (w0 * PER) // group
            if AFFINE:
                u = tl.load(lu_ptr + coef, mask=rmask, other=0.0)[:, None, None] + \
                    tl.load(lv_ptr + coef, mask=rmask, other=0.0)[:, None, None] * code.to(tl.float32)
                acc += u * x[None, :, :]
            else:
                u = tl.load(lu_ptr + coef[:, None, None] * (1 << KU) + (code & ((1 << KU) - 1)),
                            mask=rmask[:, None, None], other=0.0)
                acc += u * x[None, :, :]
                if KU < BITS:
                    xq = tl.load(xq_ptr + tok * K + cols).to(tl.float32)
                    v = tl.load(lv_ptr + coef[:, None, None] * (1 << (BITS - KU)) + (code >> KU),
                                mask=rmask[:, None, None], other=0.0)
                    acc += v * xq[None, :, :]
        tl.store(y_ptr + tok * M + rows, tl.sum(tl.sum(acc, axis=2), axis=1), mask=rmask)


def available() -> bool:
    return triton is not None


def _launch_setup(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int, block_k: int | None,
                  xq: torch.Tensor | None, per_word: int = 1):
    """Checks and buffers every fused kernel shares: the K tile, float32 inputs, the transformed
    input (unless given), the output. Returns ``(block_k, x32, xq, y)``."""
    if triton is None:
        raise RuntimeError("the fused kernel needs triton")
    block_k = block_k or block_k_for(form.group)
    if block_k is None or form.group % block_k or block_k % per_word:
        raise ValueError(f"group {form.group} has no power-of-two tile >= 16"
                         + (f" of whole {per_word}-code words" if per_word > 1 else ""))
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
    _bitplane_kernel[(triton.cdiv(m, block_m), t)](
        packed, x32, xq, form.a.contiguous(), form.bx.contiguous(), form.bq.contiguous(), y,
        m, packed.stride(0), form.bx.shape[1], form.group, K=k,
        BITS=bits, KU=form.ku, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return y


def levels_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int,
                  tables: tuple | None = None, block_m: int = 4, block_k: int | None = None, num_warps: int = 1,
                  xq: torch.Tensor | None = None, words: bool = False) -> torch.Tensor:
    """``x W^T`` ``(T, out)`` in float32 with the level-table kernel (see :func:`level_tables`;
    pass ``tables`` to reuse them across calls). ``words``: read the codes as 32-bit words
    (2, 4 or 8 bits, rows of whole words; not yet measured on a GPU, so the dispatch does not use it)."""
    per = 32 // bits if words else 1
    if words and (bits not in (2, 4, 8) or packed.shape[1] % 4):
        raise ValueError(f"32-bit words need 2, 4 or 8-bit codes and rows of whole words ({bits} bits, "
                         f"{packed.shape[1]} bytes per row)")
    block_k, x32, xq, y = _launch_setup(x, packed, form, bits, block_k, xq, per)
    (t, k), m = x.shape, packed.shape[0]
    lu, lv, affine = tables if tables is not None else level_tables(form, bits)
    grid = (triton.cdiv(m, block_m), t)
    common = dict(K=k, BITS=bits, KU=form.ku, AFFINE=affine, BLOCK_M=block_m, num_warps=num_warps)
    if words:
        w = packed.contiguous().view(torch.int32)
        _levels_words_kernel[grid](w, x32, xq, lu, lv, y, m, w.stride(0), form.bx.shape[1], form.group,
                                   BLOCK_W=block_k // per, **common)
    else:
        _levels_kernel[grid](packed, x32, xq, lu, lv, y, m, packed.stride(0), form.bx.shape[1], form.group,
                             BLOCK_K=block_k, **common)
    return y


def fused_matmul(x: torch.Tensor, packed: torch.Tensor, form: BitplaneForm, bits: int,
                 tables: tuple | None) -> torch.Tensor:
    """The kernel and tile measured fastest on the H200 for this format (eval/results/bench_kernels.md):
    the bit-plane kernel for kashin at 2 bits (two planes), the level-table kernel otherwise."""
    if form.transform is not None and bits <= 2:
        return bitplane_matmul(x, packed, form, bits, block_m=4, num_warps=1)
    return levels_matmul(x, packed, form, bits, tables=tables, block_m=2, num_warps=1)
