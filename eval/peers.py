"""Data-free peer quantizers, run through their real packages, as weight codecs.

A codec maps a float weight ``(out, in)`` to ``(w_hat, stored_bits)``: the weight the peer's
own dequantization produces and every bit its format stores for that layer that is computed
from the weight (packed codes, scales, zero points, nested statistics); fixed tables that
are constants of the format are not counted, as for quantune. The comparison
harness evaluates models whose Linear weights are replaced by ``w_hat`` in float32, so the
numbers measure each peer's quantization, not its kernels.

* ``bnb-nf4`` / ``bnb-fp4`` (``-dq`` for double quantization): bitsandbytes
  ``functional.quantize_4bit`` / ``dequantize_4bit``, block size 64, as in QLoRA.
* ``hqq-<bits>-g<group>``: HQQ's ``Quantizer.quantize`` with its half-quadratic zero-point
  optimisation (``optimize=True``), axis 1; scale and zero are stored in float16 (HQQ keeps
  them in the compute dtype), so they are rounded to float16 before dequantization.
"""
from __future__ import annotations

import re

import torch


def bnb_codec(quant_type: str, double_quant: bool):
    def codec(w: torch.Tensor):
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, compress_statistics=double_quant,
                                        quant_type=quant_type)
        w_hat = F.dequantize_4bit(packed, state).float()
        # the NF4/FP4 and dynamic-map code tables are constants of the format (bitsandbytes
        # rebuilds the same tables for every tensor), so, like quantune's sign tables, they
        # are not counted; everything computed from the weight is.
        tensors = [packed, state.absmax]
        bits = 0
        if state.nested:
            tensors.append(state.state2.absmax)
            bits = 32  # the nested offset (one float32)
        bits += sum(t.numel() * t.element_size() * 8 for t in tensors)
        return w_hat.reshape(w.shape), bits

    return codec


def hqq_codec(bits: int, group: int):
    def codec(w: torch.Tensor):
        from hqq.core.quantize import Quantizer

        w_q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, optimize=True, axis=1,
                                       compute_dtype=torch.float32, device=str(w.device))
        meta = dict(meta)
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        w_hat = Quantizer.dequantize(w_q, meta).reshape(w.shape).float()
        groups = w.numel() // group
        return w_hat, bits * w.numel() + 2 * 16 * groups

    return codec


def peer_codec(name: str):
    """The codec for a peer name such as ``bnb-nf4-dq`` or ``hqq-3-g64``."""
    m = re.fullmatch(r"bnb-(nf4|fp4)(-dq)?", name)
    if m:
        return bnb_codec(m.group(1), bool(m.group(2)))
    m = re.fullmatch(r"hqq-(\d)-g(\d+)", name)
    if m:
        return hqq_codec(int(m.group(1)), int(m.group(2)))
    raise ValueError(f"unknown peer {name!r} (bnb-nf4[-dq], bnb-fp4[-dq], hqq-<bits>-g<group>)")
