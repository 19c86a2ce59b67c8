"""LoRA adapters on quantized models, through peft.

quantune does not re-implement LoRA: it registers :class:`QuantLoraLinear` (peft's own
LoRA ``Linear`` around a :class:`~quantune.qlinear.QuantLinear` base) with peft's custom
module mechanism, so adapters are created, trained, saved (adapter_config.json +
adapter_model.safetensors) and loaded by peft itself::

    from peft import PeftModel
    model, tok = quantune.load("out/smollm2-k2")
    model = PeftModel.from_pretrained(model, "out/smollm2-k2-lora", config=quantune.lora.peft_config_from("out/smollm2-k2-lora"))
    # or simply: model = quantune.lora.load_adapter(model, "out/smollm2-k2-lora")

Merging into a quantized layer is not possible (its weight is packed codes); ``quantune
merge`` folds the adapter into a dequantized float copy instead (:func:`merge_into_float`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from quantune.config import QuantuneError
from quantune.qlinear import QuantLinear

DEFAULT_TARGETS = "all-linear"  # every quantized Linear of the blocks (the head is never quantized)


def _peft():
    try:
        import peft
    except ImportError as exc:  # a declared dependency; a clear line if a broken install lacks it
        raise QuantuneError("LoRA needs the 'peft' package: pip install peft") from exc
    return peft


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class QuantLoraLinear(PeftLoraLinear):
        """peft's LoRA Linear with a QuantLinear base: y = base(x) + B A dropout(x) * scaling."""

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise QuantuneError("a LoRA adapter cannot be merged into packed quantized weights; "
                                "use `quantune merge` (dequantized base + B A, optionally re-quantized)")

        def unmerge(self) -> None:
            raise QuantuneError("quantized LoRA layers are never merged, so there is nothing to unmerge")

        def __repr__(self) -> str:
            return "quantune." + super().__repr__()

    return QuantLoraLinear


_QUANT_LORA_LINEAR = None


def quant_lora_linear_class():
    global _QUANT_LORA_LINEAR
    if _QUANT_LORA_LINEAR is None:
        _QUANT_LORA_LINEAR = _lora_linear_class()
    return _QUANT_LORA_LINEAR


def register(config):
    """Register QuantLinear -> QuantLoraLinear on a peft LoraConfig (returns the config)."""
    config._register_custom_module({QuantLinear: quant_lora_linear_class()})
    return config


def make_lora_config(r: int = 16, alpha: float = 32, dropout: float = 0.0, target_modules=None,
                     rslora: bool = False, init: str = "default"):
    """A registered peft LoraConfig. ``target_modules``: None for every quantized Linear, or
    names/suffixes (``["q_proj", "v_proj"]``). ``init``: "default" (B = 0) or "residual"
    (filled later by :func:`residual_init`; the adapter starts as peft's default)."""
    peft = _peft()
    if not isinstance(r, int) or r < 1:
        raise QuantuneError(f"LoRA rank must be a positive integer, got {r!r}")
    if alpha <= 0:
        raise QuantuneError(f"LoRA alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise QuantuneError(f"LoRA dropout must lie in [0, 1), got {dropout}")
    if init not in ("default", "residual"):
        raise QuantuneError(f"unknown LoRA init {init!r}; choose default or residual")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, bias="none",
                             task_type="CAUSAL_LM",
                             target_modules=list(target_modules) if target_modules else None)
    return register(config)


def quantized_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def attach_lora(model: nn.Module, config):
    """Wrap a quantized model with fresh LoRA adapters on its QuantLinear layers (base frozen)."""
    peft = _peft()
    names = quantized_module_names(model)
    if not names:
        raise QuantuneError("the model has no quantized layer to attach LoRA adapters to")
    if config.target_modules is None:
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in names})
    else:
        wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise QuantuneError(f"--target-modules names no quantized layer: {', '.join(missing)} "
                                f"(quantized layers end in: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))})")
    register(config)
    for p in model.parameters():
        p.requires_grad_(False)
    return peft.get_peft_model(model, config)


def lora_layers(peft_model) -> dict:
    cls = quant_lora_linear_class()
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, cls)}


@torch.no_grad()
def residual_init(peft_model, original: nn.Module, adapter: str = "default") -> dict:
    """LoftQ-style start: A, B from the truncated SVD of W - dequant(W_q), so that
    base + B A * scaling is the best rank-r approximation of the original weight.

    ``original`` is the float model the quantized one was made from (same module names).
    Returns per-layer relative residual error before and after.
    """
    stats = {}
    orig_modules = dict(original.named_modules())
    for name, layer in lora_layers(peft_model).items():
        key = _strip_peft_prefix(name)
        linear = orig_modules.get(key)
        base = layer.get_base_layer()
        if not isinstance(linear, nn.Linear) or linear.weight.shape != (base.out_features, base.in_features):
            raise QuantuneError(f"residual init: the original model has no Linear {key} of shape "
                                f"{base.out_features}x{base.in_features}; is it the model this was quantized from?")
        w = linear.weight.detach().float().to(base.codes.device)
        residual = w - base.dequantize()
        r, scaling = layer.r[adapter], layer.scaling[adapter]
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:r].sqrt()
        b = u[:, :r] * root / math.sqrt(scaling)
        a = root[:, None] * vh[:r] / math.sqrt(scaling)
        layer.lora_A[adapter].weight.copy_(a.to(layer.lora_A[adapter].weight.dtype))
        layer.lora_B[adapter].weight.copy_(b.to(layer.lora_B[adapter].weight.dtype))
        after = residual - (b @ a) * scaling
        norm = w.norm().clamp(min=1e-30)
        stats[key] = {"before": float(residual.norm() / norm), "after": float(after.norm() / norm)}
    return stats


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


def peft_config_from(adapter_dir: str | Path):
    """The adapter's LoraConfig, registered for quantized layers (pass it to PeftModel.from_pretrained)."""
    peft = _peft()
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QuantuneError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise QuantuneError(f"could not read {adapter_dir}/adapter_config.json: {exc}") from exc
    return register(config)


def check_adapter_matches(model: nn.Module, adapter_dir: str | Path) -> None:
    """Fail clearly when an adapter was trained on another base (other layer names or shapes)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise QuantuneError(f"{adapter_dir} has no adapter_model.safetensors")
    modules = dict(model.named_modules())
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            # keys look like base_model.model.<module>.lora_A.weight
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            target = modules.get(module)
            if target is None:
                raise QuantuneError(f"adapter {adapter_dir} was trained on another model: it has no layer {module}")
            shape = f.get_slice(key).get_shape()
            dim = target.in_features if kind.startswith("A") else target.out_features
            if kind.startswith("A") and shape[1] != dim or kind.startswith("B") and shape[0] != dim:
                raise QuantuneError(f"adapter {adapter_dir} does not fit this model: {key} has shape {shape} "
                                    f"but {module} is {target.out_features}x{target.in_features}")


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """``PeftModel`` of a quantized ``model`` with the adapter saved in ``adapter_dir``."""
    peft = _peft()
    config = peft_config_from(adapter_dir)
    check_adapter_matches(model, adapter_dir)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=trainable)


@torch.no_grad()
def merge_into_float(peft_model, dtype=torch.float32) -> nn.Module:
    """The base model with every QuantLoraLinear replaced by a float nn.Linear holding
    dequant(W_q) + B A * scaling (a standard transformers model, no quantization left)."""
    merged_layers = {}
    for name, layer in lora_layers(peft_model).items():
        base = layer.get_base_layer()
        w = base.dequantize()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                w = w + layer.get_delta_weight(adapter).float()
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=w.device, dtype=dtype)
        linear.weight.copy_(w.to(dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias.to(dtype))
        merged_layers[_strip_peft_prefix(name)] = linear
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name, linear in merged_layers.items():
        model.set_submodule(name, linear)
    for name, module in list(model.named_modules()):  # QuantLinears not targeted by the adapter
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.codes.device, dtype=dtype)
            linear.weight.copy_(module.dequantize().to(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
            model.set_submodule(name, linear)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    return model


def adapter_info(adapter_dir: str | Path) -> dict:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                                    "base_model_name_or_path")}
