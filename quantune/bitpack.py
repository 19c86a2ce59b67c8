"""Bit packing of integer codes at any width from 1 to 8 bits.

Codes are unsigned integers ``0 <= c < 2**bits`` stored one per uint8. ``pack_codes``
packs them along the last dimension, little-endian within each byte: every run of 8 codes
becomes exactly ``bits`` bytes, so a row of ``n`` codes takes ``ceil(n / 8) * bits``
bytes. The layout is the same for every width, which keeps one pair of functions exact for
2, 3, 4, 8 (and 1, 5, 6, 7) bits.
"""
from __future__ import annotations

import torch

_MAX_BITS = 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {_MAX_BITS}], got {bits!r}")


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of width ``bits`` take once packed."""
    _check_bits(bits)
    return (n + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``(..., n)`` into uint8 bytes ``(..., ceil(n/8) * bits)``."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(codes.max())})")
    *lead, n = codes.shape
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    # (..., n8, 8, bits): bit j of each code, then 8*bits bits per block -> bits bytes
    bit_planes = (codes.unsqueeze(-1) >> shifts) & 1
    bit_planes = bit_planes.reshape(*lead, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device)).to(torch.uint8)
    packed = (bit_planes * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
    return packed.reshape(*lead, packed_row_bytes(n, bits))


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes ``(..., ceil(n/8) * bits)`` -> codes ``(..., n)``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed rows hold {nbytes} bytes, expected {packed_row_bytes(n, bits)} "
            f"for {n} codes of {bits} bits"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bit_stream = (packed.unsqueeze(-1) >> shifts) & 1  # (..., nbytes, 8)
    bit_planes = bit_stream.reshape(*lead, -1, bits)  # (..., n8*8, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    codes = (bit_planes * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
    return codes[..., :n]
