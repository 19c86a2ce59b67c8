"""Triton kernels for the quantization fit's arithmetic on the GPU (the inference kernels are in
:mod:`quantune.kernels`).

:func:`nearest_level` is kashin's code assignment (:func:`quantune.kashin.nearest_level` followed by
the level's value) in one pass: each entry of ``target`` ``(B, g)`` takes the nearest of its row's
``L`` levels ``(B, L)``. The torch path on the GPU sorts the levels, binary-searches every entry
(``searchsorted``), gathers the two neighbours, compares the distances, picks the winner's value
and gathers its index: about ten passes over ``(B, g)``, half of them with 64-bit indices. The
kernel reads each entry once and writes its index and value, with the same float operations and
the same tie rule (the lower of two equally near levels in sorted order, the sort itself done by
the same ``torch.sort``), so its results are bit for bit the torch path's.

:data:`NEAREST_KERNEL` is off until the device has timed it (``eval/bench_quantize.py``: the
arithmetic alone, with and without it, codes compared in the same run).
"""
from __future__ import annotations

import torch

NEAREST_KERNEL = False
MAX_LEVELS = 16  # rows of up to this many levels (kashin's u at up to 4 sign steps); more fall back to torch
BLOCK = 1024

try:  # Triton is optional: CUDA machines have it; on the CPU it only serves interpreter tests
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _nearest_kernel(t_ptr, s_ptr, o_ptr, idx_ptr, val_ptr, G, L: tl.constexpr, BLOCK: tl.constexpr):
        """Row ``program_id(0)``, entries ``BLOCK`` at a time: ``pos`` = the sorted levels below the entry
        (``searchsorted``), its neighbours ``lo = pos - 1`` and ``hi = pos`` (clamped), the nearer of the two
        (``lo`` on a tie), then that level's value and its index before sorting (``o_ptr``)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < G
        t = tl.load(t_ptr + row * G + cols, mask=m, other=0.0)
        pos = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(L):
            pos += (tl.load(s_ptr + row * L + j) < t).to(tl.int32)
        hi = tl.minimum(pos, L - 1)
        lo = tl.maximum(pos - 1, 0)
        s_hi = tl.zeros([BLOCK], dtype=tl.float32)
        s_lo = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(L):
            s_j = tl.load(s_ptr + row * L + j)
            s_hi = tl.where(hi == j, s_j, s_hi)
            s_lo = tl.where(lo == j, s_j, s_lo)
        best = tl.where(tl.abs(t - s_lo) <= tl.abs(s_hi - t), lo, hi)
        value = tl.zeros([BLOCK], dtype=tl.float32)
        index = tl.zeros([BLOCK], dtype=tl.int64)
        for j in tl.static_range(L):
            value = tl.where(best == j, tl.load(s_ptr + row * L + j), value)
            index = tl.where(best == j, tl.load(o_ptr + row * L + j), index)
        tl.store(idx_ptr + row * G + cols, index, mask=m)
        tl.store(val_ptr + row * G + cols, value, mask=m)


def serves(target: torch.Tensor, levels: torch.Tensor) -> bool:
    """Whether the kernel takes this assignment: Triton present, float32 rows of at most :data:`MAX_LEVELS`
    levels, on CUDA (or on the CPU under ``TRITON_INTERPRET=1``, for tests)."""
    return (triton is not None and target.dtype == torch.float32 and levels.dtype == torch.float32
            and target.dim() == 2 and levels.dim() == 2 and target.shape[0] == levels.shape[0]
            and 1 <= levels.shape[1] <= MAX_LEVELS)


def nearest_level(target: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, value)``, each ``(B, g)``: for every entry of ``target`` ``(B, g)`` the index of the nearest of its
    row's ``levels`` ``(B, L)`` (int64, as :func:`quantune.kashin.nearest_level`) and that level's value; see
    :func:`serves` for what it takes."""
    if not serves(target, levels):
        raise ValueError(f"the nearest-level kernel takes float32 (B, g) targets and (B, L <= {MAX_LEVELS}) levels; "
                         f"got {tuple(target.shape)} {target.dtype} and {tuple(levels.shape)} {levels.dtype}")
    b, g = target.shape
    sorted_levels, order = levels.sort(dim=-1)
    target = target.contiguous()
    index = torch.empty(b, g, dtype=torch.int64, device=target.device)
    value = torch.empty(b, g, dtype=torch.float32, device=target.device)
    if b and g:
        _nearest_kernel[(b, triton.cdiv(g, BLOCK))](target, sorted_levels.contiguous(), order.contiguous(), index,
                                                      value, g, L=levels.shape[1], BLOCK=BLOCK)
    return index, value


def nearest_or_torch(target: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_level` where it serves the assignment, else the torch path (same results either way)."""
    from quantune.kashin import nearest_level_values

    return nearest_level(target, levels) if serves(target, levels) else nearest_level_values(target, levels)


def nearest_for(device: torch.device | str):
    """What kashin's fit assigns codes with on ``device`` (``kashin_decompose``'s ``nearest``): the kernel, with the
    torch path for what it does not take, where :data:`NEAREST_KERNEL` is on and the device is CUDA; else None
    (the torch path)."""
    on = NEAREST_KERNEL and triton is not None and torch.device(device).type == "cuda"
    return nearest_or_torch if on else None
