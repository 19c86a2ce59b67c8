"""Group-wise round-to-nearest (RTN), the baseline quantizer.

For each group of ``g`` consecutive weights along the input dimension:

* symmetric:  ``s = 2 max|w| / (2**b - 1)``, ``q = clamp(round(w / s), -2**(b-1), 2**(b-1) - 1)``,
  stored as ``q + 2**(b-1)``; ``w_hat = (code - 2**(b-1)) * s``. This is the GPTQ-style
  symmetric grid (zero point at the middle code); it reproduces the reference figures this
  project compares against (eval/results/notes.md). The largest positive weight clips to
  ``(2**(b-1) - 1) s``, slightly below max|w|.
* asymmetric: ``s = (max w - min w) / (2**b - 1)``, ``q = clamp(round((w - min) / s), 0, 2**b - 1)``;
  ``w_hat = code * s + min``.

Scales and minima are float16; codes are computed against the rounded float16 values so
that what is stored is exactly what was fitted.
"""
from __future__ import annotations

import torch


def rtn_quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Quantize ``w`` ``(m, n)`` in groups of ``group`` columns.

    Returns ``codes`` ``(m, n)`` uint8, ``scales`` ``(m, n // group)`` float16 and ``mins``
    ``(m, n // group)`` float16 (None when symmetric).
    """
    m, n = w.shape
    assert n % group == 0, (n, group)
    wg = w.float().reshape(m, n // group, group)
    if symmetric:
        half = 1 << (bits - 1)
        scales = (2 * wg.abs().amax(-1) / ((1 << bits) - 1)).half()
        s = scales.float().clamp(min=1e-12)[..., None]
        q = torch.round(wg / s).clamp(-half, half - 1) + half
        return q.to(torch.uint8).reshape(m, n), scales, None
    qmax = (1 << bits) - 1
    mins = wg.amin(-1).half()
    scales = ((wg.amax(-1) - mins.float()) / qmax).half()
    s = scales.float().clamp(min=1e-12)[..., None]
    q = torch.round((wg - mins.float()[..., None]) / s).clamp(0, qmax)
    return q.to(torch.uint8).reshape(m, n), scales, mins


def rtn_dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """Float32 weights ``(m, n)`` from codes ``(m, n)`` and per-group ``scales``/``mins`` ``(m, G)``."""
    m, n = codes.shape
    groups = scales.shape[-1]
    q = codes.float().reshape(m, groups, n // groups)
    if mins is None:
        q = q - (1 << (bits - 1))
        return (q * scales.float()[..., None]).reshape(m, n)
    return (q * scales.float()[..., None] + mins.float()[..., None]).reshape(m, n)
