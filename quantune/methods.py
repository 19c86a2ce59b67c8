"""Quantization methods behind one interface.

A method turns a float weight ``(out, in)`` into named tensors (packed codes plus small
metadata) and back. :class:`quantune.qlinear.QuantLinear` stores those tensors as buffers
and never needs to know which method made them. Add a method by subclassing
:class:`Method` and adding it to ``METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantune.bitpack import pack_codes, packed_row_bytes, unpack_codes
from quantune.config import QuantConfig, QuantuneError
from quantune.kashin import kashin_decode, kashin_decompose, kashin_factors
from quantune.transforms import hadamard_block_size
from quantune.rtn import rtn_dequantize, rtn_quantize

SEED_BITS = 64  # a kashin layer stores its transform as a seed, counted in bits per weight
KASHIN_BLOCK_ELEMENTS = 1 << 24  # weights decomposed at once (bounds the quantizer's working memory)


def effective_group_size(n: int, group_size: int | None) -> int:
    """The group used for width ``n``: the largest divisor of ``n`` that is <= group_size."""
    if group_size is None or group_size >= n:
        return n
    g = max(d for d in range(1, group_size + 1) if n % d == 0)
    if g < 8:
        raise QuantuneError(f"width {n} has no divisor between 8 and group size {group_size}; "
                            "choose another --group-size or none (per row)")
    return g


@dataclass
class BitplaneForm:
    """Every format here decodes linearly in the bits of its codes. With ``bit_t`` the
    t-th bit of each code (0/1), ``G`` groups of ``group`` weights per row and ``xq = Q^T x``
    per group (the seeded transform; only for planes t >= ku),

        y[i] = sum_g ( sum_t a[i,g,t] * <bit_t[i, g], x_t[g]> + bx[i,g] * sum(x[g]) + bq[i,g] * sum(xq[g]) )

    with ``x_t = x`` for t < ku and ``xq`` otherwise. A kernel reads packed codes once and
    keeps ``bits`` running dot products per row; nothing is decoded to a float weight.
    """

    a: torch.Tensor | None    # (out, G, bits) float32; None: see below
    bx: torch.Tensor | None   # (out, G) float32
    bq: torch.Tensor | None   # (out, G) float32 (zero without a transformed factor)
    ku: int            # planes applied to x; the rest to xq
    group: int
    transform: str | None
    seed: int
    groups: int = -1   # G (taken from bx or c when not given)
    c: torch.Tensor | None = None  # (out, G, bits) float16: kashin's stored coefficients, a = 2 c
    folds: int = 0     # bit t set: a[..., t] == 2 a[..., t-1] everywhere, both below ku (see doubling_folds)

    # The kernel path (QuantLinear.kernel_form) passes forms without a/bx/bq, so that a layer on the GPU keeps no
    # float32 copy of what is stored: an affine format's (rtn) kernels read its level tables (the stored float16
    # scales, quantune.kernels.level_tables); kashin's word-reading kernels read c, the stored float16
    # coefficients themselves (a_t = 2 c_t, bx = -sum_{t<ku} c_t, bq = -sum_{t>=ku} c_t). Code that needs the
    # float32 planes asks for them with planes().

    def __post_init__(self):
        if self.groups < 0:
            self.groups = (self.bx if self.bx is not None else self.c).shape[1]

    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, bx, bq)`` in float32 (computed from ``c`` when the form carries only that), or a clear error for
        a form that carries neither."""
        if self.a is not None:
            return self.a, self.bx, self.bq
        if self.c is not None:
            c = self.c.float()
            return 2 * c, -c[..., :self.ku].sum(-1), -c[..., self.ku:].sum(-1)
        raise ValueError("this form carries no plane coefficients (an affine format's kernel form, whose "
                         "kernels read its level tables); QuantLinear.bitplane_form() has them")


def doubling_folds(c: torch.Tensor, ku: int) -> int:
    """A bitmask of the planes t (0 < t < ku) whose coefficients are exactly twice the plane's below in every
    (row, group) of ``c`` ``(..., bits)``: kashin's tied steps (QuantConfig.tied_steps). Each such run of planes
    decodes as one integer field, so the few-token GEMV reads it as one plane (kernels.plane_masks). Read from
    the stored values, never from the config, so a folder's settings cannot make a kernel misread it."""
    folds = 0
    for t in range(1, ku):
        if bool((c[..., t].float() == 2 * c[..., t - 1].float()).all()):
            folds |= 1 << t
    return folds


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

    def affine_tables(self, buffers: dict, cfg: QuantConfig) -> tuple | None:
        """For a format whose codes decode affinely (``offset + scale * code`` per (row, group)): the level
        tables :func:`quantune.kernels.level_tables` would compute from the form, as the stored tensors
        themselves (no copy); else None."""
        return None

    def factors(self, buffers: dict, out_features: int, in_features: int, cfg: QuantConfig) -> dict:
        """Named factor matrices ``(out, in)`` the weight is built from (none for scalar methods)."""
        return {}

    def bitplane_form(self, buffers: dict, out_features: int, in_features: int, cfg: QuantConfig) -> BitplaneForm:
        """The weight as bit planes of its codes (see :class:`BitplaneForm`), for fused kernels."""
        raise NotImplementedError


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
        vectors = w.reshape(m * n // g, g)
        # vectors are independent: decompose them a block at a time, so the working memory (some
        # tens of bytes per weight) stays bounded by the block, not the layer
        from quantune.fit_kernels import nearest_for

        nearest = nearest_for(w.device)  # the GPU's code-assignment kernel where switched on (same results)
        parts = [kashin_decompose(v, cfg.ku, cfg.kv, cfg.transform, cfg.seed, cfg.sweeps, cfg.tied, nearest)
                 for v in vectors.split(max(1, KASHIN_BLOCK_ELEMENTS // g))]
        sq = [float(v.float().square().sum()) for v in vectors.split(max(1, KASHIN_BLOCK_ELEMENTS // g))]
        history = [(sum(p.history[i] ** 2 * q for p, q in zip(parts, sq)) / max(sum(sq), 1e-60)) ** 0.5
                   for i in range(len(parts[0].history))]
        codes = pack_codes(torch.cat([p.codes for p in parts]).reshape(m, n), cfg.bits)
        return {"codes": codes, "coeffs": torch.cat([p.coeffs for p in parts])}, {"history": history, "group_size": g}

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

    def bitplane_form(self, buffers, out_features, in_features, cfg):
        # u = sum_t c_t (2 bit_t - 1) over the low ku bits, v likewise over the high kv bits
        g = effective_group_size(in_features, cfg.group_size)
        c = buffers["coeffs"].float().reshape(out_features, in_features // g, cfg.bits)
        return BitplaneForm(a=2 * c, bx=-c[..., :cfg.ku].sum(-1), bq=-c[..., cfg.ku:].sum(-1), ku=cfg.ku, group=g,
                            transform=cfg.transform if cfg.kv else None, seed=cfg.seed,
                            folds=doubling_folds(c, cfg.ku))


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

    def affine_tables(self, buffers, cfg):
        # level_tables of the form below: (offset, scale, True), the offset None on the symmetric grid (the
        # kernels derive it from the scale); both float16 as stored
        return buffers.get("mins"), buffers["scales"], True

    def bitplane_form(self, buffers, out_features, in_features, cfg):
        # symmetric: w = s (code - 2^(b-1)); asymmetric: w = s code + min; code = sum_t 2^t bit_t
        s = buffers["scales"].float()
        powers = (2.0 ** torch.arange(cfg.bits, device=s.device)).float()
        mins = buffers.get("mins")
        bx = -s * (1 << (cfg.bits - 1)) if mins is None else mins.float()
        return BitplaneForm(a=s[..., None] * powers, bx=bx, bq=torch.zeros_like(bx), ku=cfg.bits,
                            group=effective_group_size(in_features, cfg.group_size), transform=None, seed=cfg.seed)


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

