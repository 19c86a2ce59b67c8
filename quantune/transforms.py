"""Seeded fast orthogonal transforms along the last dimension.

Each transform is ``T(x) = Q^T x`` for an orthogonal ``Q`` that is never stored: it is
rebuilt from ``(kind, n, seed)``.

* ``dct``: ``Q^T = C D`` with ``D = diag(s)`` a seeded random sign vector and ``C`` the
  orthonormal DCT-II, computed through an FFT of length ``n`` (Makhoul 1980), so any
  length works (576, 1536, ...) in ``O(n log n)``.
* ``hadamard``: ``Q^T = H D`` with ``H`` block-diagonal normalised Walsh-Hadamard
  matrices of size ``2**k``, the largest power of two dividing ``n`` (so ``n = 576`` uses
  nine 64-blocks). Computed with the in-place butterfly, ``O(n log n)``.

``inverse_transform`` applies ``Q``. Both are exact up to floating-point rounding and
batched over every leading dimension.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

TRANSFORMS = ("dct", "hadamard")


@lru_cache(maxsize=256)
def random_signs(n: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """A reproducible +-1 vector of length ``n`` (the same on every device); cached, since
    every decode of a layer needs it. Callers must not modify it in place."""
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (n,), generator=gen)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def hadamard_block_size(n: int) -> int:
    """Largest power of two dividing ``n``: the Walsh-Hadamard block size used for ``n``."""
    return n & (-n)


def _fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform over consecutive blocks of ``block``."""
    *lead, n = x.shape
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.reshape(-1, n // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, n)) / math.sqrt(block)


@lru_cache(maxsize=64)
def dct_twiddle(n: int, device: torch.device, dtype: torch.dtype):
    k = torch.arange(n, dtype=torch.float64)
    w = torch.exp(-1j * math.pi * k / (2 * n))
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    ctype = torch.complex64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.complex128
    return (w * scale).to(device=device, dtype=ctype)


def dct_ortho(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension."""
    n = x.shape[-1]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    v = torch.cat((work[..., 0::2], work[..., 1::2].flip(-1)), dim=-1)
    twiddle = dct_twiddle(n, x.device, work.dtype)
    out = (torch.fft.fft(v, dim=-1) * twiddle).real
    return out.to(x.dtype)


def idct_ortho(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_ortho` (orthonormal DCT-III) along the last dimension."""
    n = y.shape[-1]
    work = y if y.dtype in (torch.float32, torch.float64) else y.float()
    twiddle = dct_twiddle(n, y.device, work.dtype)
    # With X_k = Re(t_k V_k) and V the FFT of a real sequence (V_{n-k} = conj V_k), one
    # finds V_k = (X_k - i X_{n-k}) / t_k, taking X_n = 0.
    rev = torch.cat((torch.zeros_like(work[..., :1]), work[..., 1:].flip(-1)), dim=-1)
    spec = (work - 1j * rev) / twiddle
    v = torch.fft.ifft(spec, dim=-1).real
    half = (n + 1) // 2
    x = torch.empty_like(work)
    x[..., 0::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x.to(y.dtype)


def forward_transform(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """``Q^T x`` along the last dimension."""
    n = x.shape[-1]
    signs = random_signs(n, seed, device=x.device, dtype=x.dtype)
    if kind == "dct":
        return dct_ortho(x * signs)
    if kind == "hadamard":
        return _fwht(x * signs, hadamard_block_size(n))
    raise ValueError(f"unknown transform {kind!r}; choose one of {TRANSFORMS}")


def inverse_transform(y: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """``Q y`` along the last dimension (the inverse of :func:`forward_transform`)."""
    n = y.shape[-1]
    signs = random_signs(n, seed, device=y.device, dtype=y.dtype)
    if kind == "dct":
        return idct_ortho(y) * signs
    if kind == "hadamard":
        return _fwht(y, hadamard_block_size(n)) * signs
    raise ValueError(f"unknown transform {kind!r}; choose one of {TRANSFORMS}")
