"""The one place that swaps modules: choose Linear layers, replace them by QuantLinear.

``quantize_model(model, cfg)`` quantizes every ``torch.nn.Linear`` except the output head
(kept in full precision: it is tied to the input embedding in most small models, and the
usual practice keeps it) and any name ending in one of ``cfg.skip_modules``. Embeddings and
norms are not Linear layers and stay as they are. Every decision is recorded in
``modules_in_full_precision`` with its reason; nothing is skipped silently.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from quantune.config import QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear

log = logging.getLogger(__name__)

# Known linear-like layer types that quantune cannot quantize (instead of skipping them silently).
_UNSUPPORTED_LINEAR_TYPES = ("Conv1D",)


@dataclass
class QuantizeResult:
    config: QuantConfig
    layers: dict = field(default_factory=dict)  # name -> stats
    full_precision: dict = field(default_factory=dict)  # name -> reason
    seconds: float = 0.0


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def plan_modules(model: nn.Module, cfg: QuantConfig) -> tuple[list[str], dict]:
    """Names of the Linear layers to quantize, and ``{name: reason}`` for those kept."""
    head = _output_head_name(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    targets, kept = [], {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kept[name] = "embedding (a lookup table, not a Linear layer)"
        elif type(module).__name__ in _UNSUPPORTED_LINEAR_TYPES:
            raise QuantuneError(
                f"unsupported layer {name}: {type(module).__name__} (transposed GPT-2 style weight); "
                "quantune quantizes torch.nn.Linear only"
            )
        elif isinstance(module, nn.Linear):
            if name == head:
                kept[name] = "output head" + (" tied to the input embedding" if tied else "") + \
                    " (kept in full precision by default)"
            elif any(name == s or name.endswith("." + s) for s in cfg.skip_modules):
                kept[name] = "skipped on request (--skip)"
            else:
                targets.append(name)
    unknown = [s for s in cfg.skip_modules
               if not any(n == s or n.endswith("." + s) for n, _ in model.named_modules())]
    if unknown:
        raise QuantuneError(f"--skip names no module of this model: {', '.join(unknown)}")
    if not targets:
        raise QuantuneError("the model has no torch.nn.Linear layer to quantize")
    return targets, kept


def _squared_error(stats: dict, w_norm_sq: float, sensitivity: str) -> float:
    err = stats["rel_error"] ** 2 * w_norm_sq
    return err if sensitivity == "abs" else err / max(w_norm_sq, 1e-30)


def allocate_bits(gains: dict, sizes: dict, low: int, target: float) -> set:
    """Layers to raise from ``low`` to ``low + 1`` bits, keeping the weight-weighted mean width <= ``target``.

    ``gains[name]`` is the error removed by the extra bit and ``sizes[name]`` its weight count:
    a greedy knapsack that takes the largest gain per added bit first and skips what no
    longer fits.
    """
    budget = (target - low) * sum(sizes.values())
    chosen, used = set(), 0
    for name in sorted(gains, key=lambda n: (-gains[n] / sizes[n], n)):
        if used + sizes[name] <= budget + 1e-9:
            chosen.add(name)
            used += sizes[name]
    return chosen


def quantize_model(model: nn.Module, cfg: QuantConfig, progress: bool = True,
                   sensitivity: str = "rel") -> QuantizeResult:
    """Replace the chosen Linear layers of ``model`` in place by QuantLinear.

    With a fractional ``cfg.target_bits`` (say 3.5), every layer is quantized at both
    neighbouring widths (3 and 4) and the layers whose weight error drops most per added bit
    get the wider code, up to the target average (data-free: ``sensitivity`` "rel" ranks by the
    squared error relative to the weight's squared norm, "abs" by the squared Frobenius error).
    Measured on SmolLM2-135M (eval/results/compare_smollm2_mixed_cpu.md): "rel" wins at 3.5 bits
    (ppl 62.1 vs 82.2) and 4.5 bits (36.0 vs 39.9), so it is the default.
    """
    start = time.perf_counter()
    targets, kept = plan_modules(model, cfg)
    mixed = cfg.target_bits is not None and cfg.target_bits != int(cfg.target_bits)
    low = int(cfg.target_bits) if mixed else cfg.bits
    base = cfg.replace(bits=low, module_bits={}, modules_in_full_precision=kept)
    widths = (low, low + 1) if mixed else (low,)
    candidates, gains, sizes, layer_stats = {}, {}, {}, {}
    desc = f"quantizing ({cfg.method}, {cfg.target_bits if mixed else low}-bit)"
    for name in tqdm(targets, desc=desc, unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        w_norm_sq = float(linear.weight.detach().float().pow(2).sum())
        for bits in widths:
            candidates[name, bits] = QuantLinear.from_linear(linear, base.replace(bits=bits).for_module(name), name)
        if mixed:
            lo_err, hi_err = (_squared_error(candidates[name, b][1], w_norm_sq, sensitivity) for b in widths)
            gains[name], sizes[name] = lo_err - hi_err, linear.weight.numel()
        else:
            module, layer_stats[name] = candidates.pop((name, low))
            model.set_submodule(name, module)
    module_bits = {}
    if mixed:
        module_bits = {name: low + 1 for name in sorted(allocate_bits(gains, sizes, low, cfg.target_bits))}
    result = QuantizeResult(config=base.replace(target_bits=cfg.target_bits if mixed else None,
                                                module_bits=module_bits), full_precision=kept)
    for name in targets:
        bits = module_bits.get(name, low)
        if mixed:
            module, layer_stats[name] = candidates.pop((name, bits))
            model.set_submodule(name, module)
        stats = layer_stats[name]
        stats["bits"] = bits
        result.layers[name] = stats
        log.debug("%s: %d-bit rel_error=%.4f bpw=%.3f", name, bits, stats["rel_error"], stats["bits_per_weight"])
    result.seconds = time.perf_counter() - start
    return result


def replace_with_empty_quant_linears(model: nn.Module, cfg: QuantConfig, names: list[str]) -> None:
    """Swap the named Linear layers for empty QuantLinears (buffers filled by a later load)."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise QuantuneError(f"checkpoint quantized {name}, but this model has {type(linear).__name__} there")
        model.set_submodule(name, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                           cfg.for_module(name), device=linear.weight.device, bias_dtype=linear.weight.dtype))
