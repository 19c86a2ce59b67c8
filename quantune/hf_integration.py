"""Load quantune folders with transformers' own ``from_pretrained``.

Importing this module registers, through transformers' public registration API
(``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``),

* :class:`QuantuneHfConfig`, the ``quantization_config`` class for ``quant_method: "quantune"``;
* :class:`QuantuneHfQuantizer`, the ``HfQuantizer`` that rebuilds the model skeleton.

After that, ``AutoModelForCausalLM.from_pretrained(folder)`` on a folder written by quantune:

1. reads ``quantization_config`` and validates it through :meth:`QuantConfig.from_dict`
   (a foreign or newer format is a :class:`QuantuneError`, not silently wrong weights);
2. builds the model on the meta device and, before any weight is read, swaps every
   ``torch.nn.Linear`` whose name is not in ``modules_in_full_precision`` for an empty
   :class:`QuantLinear` (``_process_model_before_weight_loading``);
3. lets transformers fill the buffers from the safetensors file. Integer codes keep their
   stored dtype in every supported transformers version; float buffers are loaded in the
   dtype of the empty module's buffer (float16), independently of ``dtype=...``;
4. checks afterwards (``_process_model_after_weight_loading``) that every QuantLinear buffer
   was really loaded with the expected shape and dtype. transformers only logs missing keys
   (and fills them with uninitialised memory), and 5.17 does not even flag a shape mismatch
   when a quantizer is active, so these checks turn a mismatched checkpoint into one clear error.

Only pre-quantized loading is supported: quantizing a float model on load is refused with a
pointer to :func:`quantune.quantize_model` and the ``quantune quantize`` CLI.

Version notes (checked against transformers 5.17.0 and 5.24.0):

* both call ``preprocess_model`` -> ``_process_model_before_weight_loading(model, dtype=...,
  device_map=..., checkpoint_files=..., use_kernels=...)`` inside the meta-device init context,
  and ``postprocess_model`` -> ``_process_model_after_weight_loading(model)`` at the end;
* 5.17 loads pre-quantized non-float tensors with ``dtype=None`` (checkpoint dtype) directly
  in ``convert_and_load_state_dict_in_model``; 5.24 moved that decision into the new
  ``HfQuantizer.get_new_dtype`` hook (same result with the default implementation);
* 5.17 skips the shape-mismatch check whenever a quantizer is present; 5.24 only for params
  for which ``param_needs_quantization`` is true (never, here);
* 5.17 has ``update_tp_plan`` / ``update_ep_plan(config)``; 5.24 replaced them by
  ``update_parallel_plan(model, plan)`` driven by ``serialized_names`` (empty here: no-op) and
  added ``update_attn_implementation``. quantune needs none of these.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from transformers.quantizers import auto as _hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantune.config import FORMAT_VERSION, QUANT_METHOD, QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import replace_with_empty_quant_linears

__all__ = ["QuantuneHfConfig", "QuantuneHfQuantizer", "register"]

_FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig))

_QUANTIZE_ON_LOAD_MESSAGE = (
    "transformers cannot quantize a model with quantune on load (only folders already quantized by "
    "quantune can be loaded); quantize with quantune.quantize_model(model, QuantConfig(...)) or the "
    "`quantune quantize` command, then load the saved folder with from_pretrained"
)


class QuantuneHfConfig(QuantizationConfigMixin):
    """transformers-side view of a :class:`QuantConfig` (the ``quantization_config`` of config.json).

    Holds the same fields as plain attributes, so ``to_dict()`` writes back exactly the
    dictionary quantune wrote; :meth:`to_quant_config` validates and returns the QuantConfig.
    """

    def __init__(self, **kwargs):
        kwargs.pop("quant_method", None)  # always quantune; a foreign value cannot dispatch here
        kwargs.setdefault("format_version", FORMAT_VERSION)  # built in code: this version
        qcfg = QuantConfig.from_dict(kwargs)  # fail early: unknown fields, bad values, newer format
        for key, value in qcfg.to_dict().items():
            setattr(self, key, value)
        self.quant_method = QUANT_METHOD

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Build from a stored ``quantization_config`` (what transformers calls for config.json).

        Strict, unlike ``__init__``: a stored config must name its format version.
        """
        QuantConfig.from_dict(config_dict)
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_quant_config(cls, qcfg: QuantConfig) -> "QuantuneHfConfig":
        return cls(**qcfg.to_dict())

    def to_quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.to_dict())

    def to_dict(self) -> dict:
        d = {name: copy.deepcopy(getattr(self, name)) for name in _FIELDS}
        d["quant_method"] = QUANT_METHOD
        return d

    def __iter__(self):
        yield from self.to_dict().items()


class QuantuneHfQuantizer(HfQuantizer):
    """Rebuilds QuantLinear modules for pre-quantized quantune checkpoints."""

    requires_calibration = True  # the weights must already be quantized by quantune
    quantization_config: QuantuneHfConfig

    def __init__(self, quantization_config, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise QuantuneError(_QUANTIZE_ON_LOAD_MESSAGE)
        if isinstance(quantization_config, dict):
            quantization_config = QuantuneHfConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    def validate_environment(self, *args, **kwargs):
        self.quantization_config.to_quant_config()

    def _process_model_before_weight_loading(self, model, **kwargs):
        qcfg = self.quantization_config.to_quant_config()
        kept = qcfg.modules_in_full_precision
        names = [name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name not in kept]
        if not names:
            raise QuantuneError("quantization_config lists every Linear layer of this model as full "
                                "precision: nothing to load as quantized")
        replace_with_empty_quant_linears(model, qcfg, names)
        self.modules_to_not_convert = list(kept)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Check every QuantLinear buffer was loaded, with its stored shape and dtype."""
        missing, wrong = [], []
        for name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            specs = module.method.buffer_specs(module.out_features, module.in_features, module.qconfig)
            for key, (shape, dtype) in specs.items():
                buf = getattr(module, key)
                full = f"{name}.{key}" if name else key
                if buf.device.type == "meta":  # offloaded by accelerate: loaded later, on use
                    continue
                if not getattr(buf, "_is_hf_initialized", False):
                    missing.append(full)
                elif tuple(buf.shape) != tuple(shape):
                    wrong.append(f"{full} has shape {tuple(buf.shape)}, expected {tuple(shape)}")
                elif buf.dtype != dtype:
                    # e.g. a `_keep_in_fp32_modules` dtype plan upcast float16 metadata: undo it if exact
                    restored = buf.to(dtype)
                    if not torch.equal(restored.to(buf.dtype), buf):
                        wrong.append(f"{full} was loaded as {buf.dtype}, expected {dtype}")
                    else:
                        module._buffers[key] = restored
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise QuantuneError(f"checkpoint lacks quantized tensors {', '.join(missing[:5])}{more}: "
                                "the folder does not match this model or its quantization_config")
        if wrong:
            raise QuantuneError(f"checkpoint tensor mismatch: {wrong[0]}"
                                + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        return model

    def _dequantize(self, model, dtype=None):
        """Replace every QuantLinear by a float ``nn.Linear`` holding its decoded weight."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, QuantLinear):
                continue
            weight = module.dequantize()
            bias = module.bias
            out_dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                               device=weight.device, dtype=out_dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            model.set_submodule(name, linear)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """transformers compiles a loaded model's forward in ``generate`` with a static cache
        (``cache_implementation="static"``) only when the quantizer says it can: each QuantLinear is one
        custom op in the compiled graph (``quantune::linear``), with no graph break."""
        return True


def _register_one(mapping: dict, name: str, cls: type, register_fn) -> None:
    existing = mapping.get(name)
    if existing is cls:
        return
    if existing is not None:
        if (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None)) != \
                (cls.__module__, cls.__qualname__):
            raise QuantuneError(
                f"transformers already has a quantization method {name!r} registered by "
                f"{existing.__module__}.{existing.__qualname__}; cannot register quantune's"
            )
        del mapping[name]  # our own class from an earlier import / importlib.reload: replace it
    register_fn(name)(cls)


def register() -> None:
    """Register quantune with transformers (idempotent; done on import)."""
    _register_one(_hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, QuantuneHfConfig,
                  _hf_auto.register_quantization_config)
    _register_one(_hf_auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD, QuantuneHfQuantizer,
                  _hf_auto.register_quantizer)


register()
