"""Quantization methods behind one interface.

A method turns a float weight ``(out, in)`` into named tensors (packed codes plus small
metadata) and back. :class:`quantune.qlinear.QuantLinear` stores those tensors as buffers
and never needs to know which method made them. Add a method by subclassing
:class:`Method` and adding it to ``METHODS``.
"""
from __future__ import annotations

import torch

from quantune.bitpack import pack_codes, packed_row_bytes, unpack_codes
from quantune.config import QuantConfig, QuantuneError
from quantune.kashin import kashin_decode, kashin_decompose, kashin_factors
from quantune.transforms import hadamard_block_size
from quantune.rtn import rtn_dequantize, rtn_quantize

SEED_BITS = 64  # a kashin layer stores its transform as a seed, counted in bits per weight


def effective_group_size(n: int, group_size: int | None) -> int:
    """The group used for width ``n``: the largest divisor of ``n`` that is <= group_size."""
    if group_size is None or group_size >= n:
        return n
    g = max(d for d in range(1, group_size + 1) if n % d == 0)
    if g < 8:
        raise QuantuneError(f"width {n} has no divisor between 8 and group size {group_size}; "
                            "choose another --group-size or none (per row)")
    return g


class Method:
    name: str

    def buffer_specs(self, out_features: int, in_features: int, cfg: QuantConfig) -> dict:
        """``{buffer name: (shape, dtype)}`` for a layer of this shape."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, cfg: QuantConfig) -> tuple[dict, dict]:
        """Float weight ``(out, in)`` -> (buffers, stats). Stats hold at least ``history``."""
        raise NotImplementedError

    def dequantize(self, buffers: dict, out_features: int, in_features: int,
                   cfg: QuantConfig) -> torch.Tensor:
        """Buffers -> float32 weight ``(out, in)``."""
        raise NotImplementedError

    def extra_bits(self, cfg: QuantConfig) -> int:
        """Bits stored outside the buffers (e.g. a seed), counted in bits per weight."""
        return 0

    def factors(self, buffers: dict, out_features: int, in_features: int, cfg: QuantConfig) -> dict:
        """Named factor matrices ``(out, in)`` the weight is built from (none for scalar methods)."""
        return {}


class KashinMethod(Method):
    name = "kashin"

    def buffer_specs(self, out_features, in_features, cfg):
        g = effective_group_size(in_features, cfg.group_size)
        vectors = out_features * (in_features // g)
        return {
            "codes": ((out_features, packed_row_bytes(in_features, cfg.bits)), torch.uint8),
            "coeffs": ((vectors, cfg.bits), torch.float16),
        }

    def quantize(self, w, cfg):
        m, n = w.shape
        g = effective_group_size(n, cfg.group_size)
        if cfg.transform == "hadamard" and cfg.kv and hadamard_block_size(g) < 8:
            raise QuantuneError(f"hadamard transform on width {g} mixes only blocks of {hadamard_block_size(g)}; "
                                "use --transform dct")
        f = kashin_decompose(w.reshape(m * n // g, g), cfg.ku, cfg.kv, cfg.transform, cfg.seed, cfg.sweeps)
        codes = pack_codes(f.codes.reshape(m, n), cfg.bits)
        return {"codes": codes, "coeffs": f.coeffs}, {"history": f.history, "group_size": g}

    def dequantize(self, buffers, out_features, in_features, cfg):
        g = effective_group_size(in_features, cfg.group_size)
        codes = unpack_codes(buffers["codes"], cfg.bits, in_features).reshape(-1, g)
        w = kashin_decode(codes, buffers["coeffs"], cfg.ku, cfg.kv, cfg.transform, cfg.seed)
        return w.reshape(out_features, in_features)

    def extra_bits(self, cfg):
        return SEED_BITS

    def factors(self, buffers, out_features, in_features, cfg):
        g = effective_group_size(in_features, cfg.group_size)
        codes = unpack_codes(buffers["codes"], cfg.bits, in_features).reshape(-1, g)
        u, v = kashin_factors(codes, buffers["coeffs"], cfg.ku, cfg.kv)
        return {"U": u.reshape(out_features, in_features), "V": v.reshape(out_features, in_features)}


class RTNMethod(Method):
    name = "rtn"

    def buffer_specs(self, out_features, in_features, cfg):
        g = effective_group_size(in_features, cfg.group_size)
        specs = {
            "codes": ((out_features, packed_row_bytes(in_features, cfg.bits)), torch.uint8),
            "scales": ((out_features, in_features // g), torch.float16),
        }
        if not cfg.symmetric:
            specs["mins"] = ((out_features, in_features // g), torch.float16)
        return specs

    def quantize(self, w, cfg):
        g = effective_group_size(w.shape[1], cfg.group_size)
        codes, scales, mins = rtn_quantize(w, cfg.bits, g, cfg.symmetric)
        buffers = {"codes": pack_codes(codes, cfg.bits), "scales": scales}
        if mins is not None:
            buffers["mins"] = mins
        return buffers, {"history": [], "group_size": g}

    def dequantize(self, buffers, out_features, in_features, cfg):
        codes = unpack_codes(buffers["codes"], cfg.bits, in_features)
        return rtn_dequantize(codes, buffers["scales"], buffers.get("mins"), cfg.bits)


METHODS: dict[str, Method] = {m.name: m for m in (KashinMethod(), RTNMethod())}


def get_method(name: str) -> Method:
    return METHODS[name]


def bits_per_weight(buffers: dict, out_features: int, in_features: int, cfg: QuantConfig) -> float:
    """Every stored bit of a layer's quantized weight (codes, codebooks, scales, seed) per weight."""
    bits = sum(t.numel() * t.element_size() * 8 for t in buffers.values())
    return (bits + get_method(cfg.method).extra_bits(cfg)) / (out_features * in_features)


def assert_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QuantuneError(f"weight of {name} has {bad} NaN/Inf value(s); refusing to quantize it")

