"""Per-layer inspection of a quantized folder: error, convergence and factor statistics.

For each QuantLinear the report gives the stored bits per weight, the relative error and
convergence history recorded at quantization time (report.json), and the "flatness" of the
weight and of each factor: the crest factor ``max|x| / rms(x)`` (a Gaussian matrix of this
size has about 4-5; outliers push it far higher). Kashin's claim is that both factors are
flat even where the weight is not; this shows it per layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantune.methods import bits_per_weight
from quantune.qlinear import QuantLinear
from quantune.serialization import load


def crest_factor(x: torch.Tensor) -> float:
    rms = x.float().pow(2).mean().sqrt()
    return float(x.abs().max() / rms) if rms > 0 else 0.0


def inspect_folder(folder: str | Path, original: str | None = None, sample_layers: int = 6) -> tuple[dict, dict]:
    """``(summary, samples)``: statistics of every layer, and the tensors of ``sample_layers``
    evenly spaced layers for plots."""
    folder = Path(folder)
    model, _ = load(folder)
    report_path = folder / "report.json"
    recorded = json.loads(report_path.read_text())["layers"] if report_path.is_file() else {}
    reference = None
    if original is not None:
        from quantune.models import load_model

        reference = load_model(original)[0]
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    step = len(quantized) // max(1, sample_layers) + 1  # +1 walks through the layer types too
    sampled = {n for n, _ in quantized[::step][:sample_layers]}
    layers, samples = {}, {}
    for name, module in quantized:
        w_hat = module.dequantize()
        factors = module.method.factors(module.buffers_dict(), module.out_features, module.in_features,
                                        module.qconfig)
        row = {
            "shape": [module.out_features, module.in_features],
            "bits_per_weight": bits_per_weight(module.buffers_dict(), module.out_features, module.in_features,
                                               module.qconfig),
            "rel_error": recorded.get(name, {}).get("rel_error"),
            "history": recorded.get(name, {}).get("history", []),
            "crest_w_hat": crest_factor(w_hat),
            **{f"crest_{k}": crest_factor(v) for k, v in factors.items()},
        }
        sample = {"W_hat": w_hat, **factors}
        if reference is not None:
            w = reference.get_submodule(name).weight.detach().float()
            row["crest_w"] = crest_factor(w)
            row["rel_error"] = float((w_hat - w).norm() / w.norm())
            sample["W"] = w
        layers[name] = row
        if name in sampled:
            samples[name] = sample
    cfg = quantized[0][1].qconfig
    summary = {"folder": str(folder), "config": cfg.to_dict(), "original": original, "layers": layers}
    return summary, samples
