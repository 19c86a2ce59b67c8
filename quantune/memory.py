"""Predict the peak GPU memory of a training run from the model's config alone, line by line.

``estimate(config, spec)`` answers "will this fit?" before a run. Nothing is loaded but the
config: the model is built on the ``meta`` device (shapes, no storage), so weights and the
quantized format's real bytes (codes, coefficients, scales, exactly as
:class:`~quantune.qlinear.QuantLinear` stores them) are counted from the real modules.

Activations come from a *trace*, not a formula: a copy of the model with one and with two
decoder layers, at the real widths but a few dozen tokens, runs one forward pass on the CPU
under ``torch.autograd.graph.saved_tensors_hooks`` and counts the bytes of every distinct
storage autograd keeps for the backward pass (parameters, buffers and cached decoded weights
excluded). Two layer counts separate the per-layer bytes from the rest, two token counts the
per-token bytes from the constant ones (a frozen fp32 weight cast to bf16 by autocast and
saved is constant per layer), and the result scales to the run's batch x sequence. Attention
runs as the flash kernel does on the GPU: ``scaled_dot_product_attention`` is replaced during
the trace by a function that keeps what flash attention keeps (q, k, v, output and the
float32 log-sum-exp), so whatever the installed transformers does around it (repeating K/V
heads or not) is traced as it happens.

The rest follows quantune's training loop (:mod:`quantune.train`): the LM head and loss run
a block of tokens at a time (one block of logits in flight), gradient checkpointing keeps
each layer's input and recomputes one layer at a time, the optimizer is fused AdamW, 8-bit
AdamW or SGD, and after the first step the optimizer states exist. The peak is the larger of
(a) everything static + all saved activations + the largest backward working set, and (b)
for full fine-tuning, everything static + all gradients (the end of the backward pass).
The fragmentation margin is shown apart: it is what the allocator may reserve beyond the
allocated peak that ``torch.cuda.max_memory_allocated`` measures.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from quantune.config import QuantConfig, QuantuneError

MODES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FRAGMENTATION = 0.05  # allocator slack beyond the allocated peak (reported apart from the prediction)
GIB = 2 ** 30


@dataclass
class MemorySpec:
    mode: str = "lora"                 # full | lora (full-precision base) | qlora (quantized base)
    bits: float = 4                    # qlora: code width (fractional: mixed widths, interpolated)
    method: str = "kashin"
    group_size: int | None = None
    lora_r: int = 16
    target_modules: tuple[str, ...] | None = None  # None: every linear layer of the blocks
    batch_size: int = 8                # sequences per micro-batch on each GPU
    seq_len: int = 2048
    precision: str = "bf16"            # autocast dtype (fp32: none)
    param_dtype: str = "fp32"          # dtype of the model's full-precision parameters
    master_weights: bool = False       # full: fp32 master copy in the optimizer (mixed-precision Adam)
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    cache_weights: bool = False        # qlora: one decoded bf16 copy of the quantized weights
    teacher: bool = False              # distillation: the original model in memory too
    gpus: int = 1
    fsdp: bool = False                 # full sharding over the GPUs (else data parallel, one replica each)

    def validate(self) -> None:
        checks = [
            (self.mode in MODES, f"unknown mode {self.mode!r}; choose {', '.join(MODES)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}"),
            (self.param_dtype in DTYPES, f"unknown parameter dtype {self.param_dtype!r}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.seq_len >= 2, f"sequence length must be >= 2, got {self.seq_len}"),
            (self.gpus >= 1, f"--gpus must be >= 1, got {self.gpus}"),
            (self.mode == "full" or self.lora_r >= 1, f"LoRA rank must be >= 1, got {self.lora_r}"),
            (self.mode != "qlora" or 2 <= self.bits <= 8, f"bits must lie in [2, 8], got {self.bits}"),
        ]
        for ok, message in checks:
            if not ok:
                raise QuantuneError(message)


@dataclass
class Line:
    name: str
    bytes: float
    detail: str = ""


@dataclass
class Estimate:
    model: str
    spec: MemorySpec
    lines: list[Line]
    peak_bytes: float
    peak_phase: str
    fragmentation_bytes: float
    parameters: int
    trainable_parameters: int
    activation_trace: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"model": self.model, "spec": asdict(self.spec), "peak_bytes": self.peak_bytes,
                "peak_gib": self.peak_bytes / GIB, "peak_phase": self.peak_phase,
                "fragmentation_margin_bytes": self.fragmentation_bytes,
                "parameters": self.parameters, "trainable_parameters": self.trainable_parameters,
                "lines": [asdict(line) for line in self.lines], "activation_trace": self.activation_trace}


# ---------------------------------------------------------------------------------------------
# the model's config and a body without storage


def load_config(spec: str):
    """The transformers config of a model argument (built-in name, folder, .gguf, hub id, or a
    config .json file), without loading weights. A quantized folder returns its config as saved."""
    from transformers import AutoConfig

    from quantune.models import resolve_model

    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix == ".json":
            return AutoConfig.for_model(**json.loads(path.read_text()))
        source, kwargs = resolve_model(spec, convert_builtin=False)
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantuneError(f"could not read the config of {spec}: {first}") from exc


def _config_with_layers(config, layers: int, vocab: int | None = None):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    if vocab is not None:
        cfg.vocab_size = vocab
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    return cfg


def _build(config, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.zero_()  # values do not matter for memory; zeros keep every op finite
    return model


def _quantize_shapes(model: nn.Module, spec: MemorySpec, bits: int) -> list[str]:
    """Swap the Linear layers quantune would quantize for empty QuantLinears (the one swap place)."""
    from quantune.quantize import plan_modules, replace_with_empty_quant_linears

    qcfg = QuantConfig(method=spec.method, bits=bits, group_size=spec.group_size)
    names, _ = plan_modules(model, qcfg)
    replace_with_empty_quant_linears(model, qcfg, names)  # on each linear's device (meta: no storage)
    return names


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Static:
    parameters: int            # every parameter of the original model
    linear_params: int         # of which in the quantized Linear layers (qlora) / all Linear layers
    largest_linear: int        # weights of the largest quantized Linear
    frozen_bytes: float        # weights as held (quantized buffers + full-precision rest)
    trainable: int             # trainable parameters (LoRA, or all)
    largest_layer_params: int  # parameters of one decoder layer (FSDP gathers a layer at a time)


@lru_cache(maxsize=32)
def _static_cached(config_json: str, spec_json: str) -> _Static:
    from transformers import AutoConfig

    return _static(AutoConfig.for_model(**json.loads(config_json)), MemorySpec(**json.loads(spec_json)))


def _static(config, spec: MemorySpec) -> _Static:
    dtype = DTYPES[spec.param_dtype]
    model = _build(config, dtype, "meta")
    parameters = sum(p.numel() for p in model.parameters())
    layers = _decoder_layers(model)
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers is not None else 0
    if spec.mode == "qlora":
        lo, hi = math.floor(spec.bits), math.ceil(spec.bits)
        code_bytes = {}
        for bits in sorted({lo, hi}):
            m = _build(config, dtype, "meta")
            linears = [m.get_submodule(n) for n in _quantize_shapes(m, spec, bits)]
            code_bytes[bits] = _bytes(t for q in linears for t in q.buffers())
        frac = spec.bits - lo  # mixed widths: between the two neighbouring widths
        rest = _bytes(m.parameters()) + _bytes(b for n, b in m.named_buffers() if not _is_quant_buffer(m, n))
        frozen = (1 - frac) * code_bytes[lo] + frac * code_bytes[hi] + rest
        linear_params = sum(q.in_features * q.out_features for q in linears)
        largest = max(q.in_features * q.out_features for q in linears)
        trainable = _lora_params([q for q, n in zip(linears, _names(m, linears)) if _targeted(n, spec)], spec)
    else:
        named = _block_linears(model)
        linear_params = sum(m.weight.numel() for _, m in named)
        largest = max((m.weight.numel() for _, m in named), default=0)
        frozen = _bytes(model.parameters()) + _bytes(b for b in model.buffers())
        trainable = parameters if spec.mode == "full" else _lora_params(
            [m for n, m in named if _targeted(n, spec)], spec)
    return _Static(parameters, linear_params, largest, frozen, trainable, layer_params)


def _names(model: nn.Module, modules) -> list[str]:
    where = {id(m): n for n, m in model.named_modules()}
    return [where[id(m)] for m in modules]


def _is_quant_buffer(model: nn.Module, name: str) -> bool:
    from quantune.qlinear import QuantLinear

    owner = name.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(owner), QuantLinear) if "." in name else False


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Linear layers inside the decoder layers (LoRA's default targets)."""
    layers = _decoder_layers(model)
    inside = {id(m) for layer in (layers or []) for m in layer.modules()}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def _targeted(module_name: str, spec: MemorySpec) -> bool:
    if spec.target_modules is None:
        return True
    return any(module_name == t or module_name.endswith("." + t) for t in spec.target_modules)


def _lora_params(linears, spec: MemorySpec) -> int:
    total = 0
    for m in linears:
        fan_in = getattr(m, "in_features", None)
        fan_out = getattr(m, "out_features", None)
        total += spec.lora_r * (fan_in + fan_out)
    return total


def _decoder_layers(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    return next((m for m in base.modules() if isinstance(m, nn.ModuleList) and n and len(m) == n), None)


# ---------------------------------------------------------------------------------------------
# the activation trace


class _FlashLike(torch.autograd.Function):
    """What flash attention keeps for its backward: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the trace never runs backward
        raise RuntimeError("trace only")


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    if torch.is_autocast_enabled(query.device.type):  # CUDA autocast runs attention in 16 bits: the
        dtype = torch.get_autocast_dtype(query.device.type)  # kernel sees (and keeps) the casts
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return _FlashLike.apply(query, key, value)


def _trace_forward(config, spec: MemorySpec, layers: int, tokens: int) -> tuple[int, dict]:
    """Bytes autograd saves in one forward of the decoder with ``layers`` layers on ``tokens``
    tokens (batch 1), in ``spec``'s mode, and the dtype of the decoder's output."""
    cfg = _config_with_layers(config, layers, vocab=256)
    model = _build(cfg, DTYPES[spec.param_dtype], "cpu")
    excluded = set()
    if spec.mode == "qlora":
        bits = max(2, math.floor(spec.bits))
        names = _quantize_shapes(model, spec, bits)
        for name in names:  # a zero decoded weight: same saved tensors as decode-on-use (see QuantLinear)
            q = model.get_submodule(name)
            q._weight_cache = torch.zeros(q.out_features, q.in_features,
                                          dtype=torch.float32 if spec.precision == "fp32" else torch.bfloat16)
            excluded.add(q._weight_cache.untyped_storage().data_ptr())
    if spec.mode in ("lora", "qlora"):
        model = _attach_trace_lora(model, spec)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    for t in list(model.parameters()) + list(model.buffers()):
        excluded.add(t.untyped_storage().data_ptr())
    from quantune.train import lm_parts

    parts = lm_parts(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = parts[0] if parts else getattr(base, base.base_model_prefix)
    seen: dict[int, int] = {}

    keep = []  # saved tensors stay alive for the whole forward, as in training (so storages are not reused)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        keep.append(t)
        return None  # the graph keeps no reference (returning t would make a cycle the GC cannot see)

    model.train()
    ids = torch.zeros(1, tokens, dtype=torch.long)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec.precision != "fp32"
                else contextlib.nullcontext())  # fp16 and bf16 have the same sizes
    from unittest import mock

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_like_sdpa), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), autocast:
        out = decoder(input_ids=ids, use_cache=False).last_hidden_state
    dtype = str(out.dtype).replace("torch.", "")
    keep.clear()
    del out, model, decoder, parts, base
    # (the copy is freed by reference counting once these names go)
    _return_freed_memory()
    return sum(seen.values()), {"hidden_dtype": dtype}


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so consecutive traces do not add up in RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _attach_trace_lora(model, spec: MemorySpec):
    from peft import LoraConfig, get_peft_model

    if spec.mode == "qlora":
        from quantune.lora import attach_lora, make_lora_config

        return attach_lora(model, make_lora_config(r=spec.lora_r, alpha=2 * spec.lora_r,
                                                   target_modules=spec.target_modules))
    names = sorted({n.rsplit(".", 1)[-1] for n, m in _block_linears(model) if _targeted(n, spec)})
    if not names:
        raise QuantuneError("the model has no linear layer in its blocks for LoRA")
    return get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=2 * spec.lora_r, target_modules=names))


def _trace_tokens(config, seq_len: int) -> tuple[int, int]:
    """Two short token counts for the trace; past a sliding window when the run goes past it
    (attention then takes a mask, and some transformers paths repeat the K/V heads)."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < seq_len:
        start = min(window + 32, 1024)
        return start, start + 32
    return 32, 64


@lru_cache(maxsize=32)
def _trace(config_json: str, spec_json: str, seq_len: int) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(config_json))
    spec = MemorySpec(**json.loads(spec_json))
    t1, t2 = _trace_tokens(config, seq_len)
    s11, info = _trace_forward(config, spec, 1, t1)
    s21, _ = _trace_forward(config, spec, 2, t1)
    s12, _ = _trace_forward(config, spec, 1, t2)
    s22, _ = _trace_forward(config, spec, 2, t2)
    layer_1, layer_2 = s21 - s11, s22 - s12                 # one layer at t1 and t2 tokens
    per_token = (layer_2 - layer_1) / (t2 - t1)
    outside_per_token = ((s12 - layer_2) - (s11 - layer_1)) / (t2 - t1)
    return {"layer_per_token": per_token, "layer_constant": layer_1 - per_token * t1,
            "outside_per_token": outside_per_token, "outside_constant": (s11 - layer_1) - outside_per_token * t1,
            "hidden_dtype": info["hidden_dtype"], "trace_tokens": [t1, t2]}


def _spec_key(spec: MemorySpec) -> str:
    keys = ("mode", "bits", "method", "group_size", "lora_r", "target_modules", "precision", "param_dtype")
    d = {k: getattr(spec, k) for k in keys}
    d["target_modules"] = list(d["target_modules"]) if d["target_modules"] else None
    return json.dumps(d, sort_keys=True)


def _config_key(config) -> str:
    d = config.to_dict()
    for k in ("quantization_config", "_pre_quantization_dtype"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# the estimate


def estimate(config, spec: MemorySpec, model_name: str = "") -> Estimate:
    spec.validate()
    st = _static_cached(_config_key(config), _spec_key(spec))
    tr = _trace(_config_key(config), _spec_key(spec), spec.seq_len)
    n_layers = config.num_hidden_layers
    hidden, vocab = config.hidden_size, config.vocab_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = spec.batch_size * spec.seq_len
    pbytes = DTYPES[spec.param_dtype].itemsize
    act_bytes = 2 if spec.precision != "fp32" else 4
    hid_bytes = DTYPES.get({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(tr["hidden_dtype"], "fp32"),
                           torch.float32).itemsize
    shard = spec.gpus if spec.fsdp else 1
    lines: list[Line] = []

    # weights, gradients, optimizer
    full = spec.mode == "full"
    weight_detail = {"full": f"{st.parameters:,} parameters in {spec.param_dtype}",
                     "lora": f"{st.parameters:,} frozen parameters in {spec.param_dtype}",
                     "qlora": f"{spec.method} {spec.bits:g}-bit codes + coefficients for {st.linear_params:,} "
                              f"weights ({8 * (st.frozen_bytes - (st.parameters - st.linear_params) * pbytes) / max(st.linear_params, 1):.2f} bits/weight), "
                              f"the rest in {spec.param_dtype}"}[spec.mode]
    lines.append(Line("weights", st.frozen_bytes / shard, weight_detail + (f"; sharded over {shard} GPUs" if shard > 1 else "")))
    if spec.mode == "qlora" and spec.cache_weights:
        cache_b = 2 if spec.precision != "fp32" else 4
        lines.append(Line("decoded weight cache", st.linear_params * cache_b, "--cache-weights: one decoded copy"))
    train_bytes = 4 if not full else pbytes  # LoRA adapters are float32; full trains the weights themselves
    if not full:
        lines.append(Line("trainable parameters (LoRA)", st.trainable * 4, f"{st.trainable:,} float32 parameters, r={spec.lora_r}"))
    grads = st.trainable * train_bytes / shard
    opt_per = {"adamw": 2 * train_bytes, "adamw8bit": 2, "sgd": 0}[spec.optimizer]
    opt_detail = {"adamw": f"AdamW: 2 states x {train_bytes} bytes", "adamw8bit": "8-bit AdamW: 2 states x 1 byte",
                  "sgd": "SGD without momentum: none"}[spec.optimizer]
    if full and spec.master_weights:  # mixed-precision Adam: fp32 master weights and fp32 moments
        opt_per = {"adamw": 12, "adamw8bit": 6, "sgd": 4}[spec.optimizer]
        opt_detail = {"adamw": "float32 master weights + AdamW moments (4 + 4 + 4 bytes)",
                      "adamw8bit": "float32 master weights + 8-bit AdamW moments (4 + 1 + 1 bytes)",
                      "sgd": "float32 master weights (4 bytes)"}[spec.optimizer]
    optimizer = st.trainable * opt_per / shard
    if spec.optimizer == "adamw8bit":
        optimizer += st.trainable * 2 * 4 / 2048 / shard  # one float32 absmax per 2048-block and state
    lines.append(Line("optimizer states", optimizer, opt_detail))
    if spec.gpus > 1 and not spec.fsdp:
        lines.append(Line("DDP gradient buckets", grads, "a flat copy of the gradients for the all-reduce"))
    if spec.fsdp and spec.gpus > 1:
        gathered = 2 * st.largest_layer_params * pbytes * (1 + (1 if full else 0))
        lines.append(Line("FSDP gathered layers", gathered, "two decoder layers unsharded at a time (current + prefetch)"
                          + (", and their gradients before the reduce-scatter" if full else "")))
    if spec.teacher:
        lines.append(Line("teacher model", st.parameters * pbytes, "the original model for distillation"))
    grad_line = Line("gradients", grads, f"{train_bytes} bytes per trained parameter")

    # activations kept for the backward pass
    per_layer = tr["layer_constant"] + tr["layer_per_token"] * tokens
    outside = max(0.0, tr["outside_constant"] + tr["outside_per_token"] * tokens)
    layer_input = tokens * hidden * hid_bytes
    if spec.grad_checkpointing:
        saved = n_layers * layer_input + outside
        recompute = per_layer
        act_detail = f"checkpointing: the inputs of {n_layers} layers, {_h(layer_input)} each"
    else:
        saved, recompute = n_layers * per_layer + outside, 0.0
        act_detail = f"{n_layers} layers x {_h(per_layer)} (traced) + {_h(outside)} outside the layers"
    act_line = Line("activations", saved, act_detail)

    # transients: the loss blocks run backward first (no layer recomputed yet), then the layers one by one
    from quantune.train import LOSS_CHUNK_ELEMENTS

    rows = min(tokens, max(256, LOSS_CHUNK_ELEMENTS // vocab))
    loss_hidden = tokens * hidden * hid_bytes  # the (tokens, hidden) copy the loss blocks are cut from
    block = rows * vocab * (2 + 4 + 4 + 4)  # logits (16-bit), float copy, log-softmax, its gradient
    if spec.teacher:
        block += rows * vocab * (2 + 4 + 4)
    if spec.precision != "fp32" and pbytes == 4:
        block += vocab * hidden * 2  # the LM head's weight cast to 16 bits, kept for the block's backward
    backward_ws = tokens * (4 * inter * act_bytes + 3 * hidden * 4)
    decode_ws = 0.0
    if spec.mode == "qlora" and not spec.cache_weights:
        decode_ws = st.largest_linear * (_decode_bytes_per_weight(spec) + act_bytes)
    transient = max(backward_ws, decode_ws)
    layer_ws = recompute + transient
    loss_line = Line("loss input", loss_hidden, "the final hidden states the LM-head blocks are cut from")
    if block >= layer_ws:
        ws_line = Line("working set", block, f"one loss block: {rows} x {vocab} logits with their float copies and "
                                             f"gradient (more than a layer's backward, {_h(layer_ws)})")
    else:
        ws_line = Line("working set", layer_ws, ("one layer recomputed (" + _h(recompute) + ") + " if recompute else "")
                       + "gradients in flight through it" + (f" (decoding the largest layer: {_h(decode_ws)})"
                                                              if decode_ws else "")
                       + f"; more than a loss block ({_h(block)})")
    during = lines + ([grad_line] if not full else []) + [act_line, loss_line, ws_line]
    end = lines + [grad_line]
    if spec.grad_checkpointing:
        end.append(Line("activations", n_layers * layer_input, act_detail))
    end.append(Line("working set", transient, "gradients in flight through the first layer"))
    total_during, total_end = sum(x.bytes for x in during), sum(x.bytes for x in end)
    if full and total_end > total_during:
        lines, peak, phase = end, total_end, "end of the backward pass (all gradients, activations freed)"
    else:
        lines, peak, phase = during, total_during, "start of the backward pass"
    frag = FRAGMENTATION * peak
    return Estimate(model_name, spec, lines, peak, phase, frag, st.parameters, st.trainable,
                    activation_trace={k: v for k, v in tr.items()})


@lru_cache(maxsize=8)
def _decode_bytes_per_weight_cached(method: str, bits: int) -> float:
    """Peak bytes per weight alive while one layer is decoded (measured on a small layer)."""
    from quantune.qlinear import QuantLinear

    q = QuantLinear(1024, 64, False, QuantConfig(method=method, bits=bits))
    with _LiveBytes() as live:
        w = q.dequantize()
        del w
    return live.peak / (1024 * 64)


def _decode_bytes_per_weight(spec: MemorySpec) -> float:
    return _decode_bytes_per_weight_cached(spec.method, max(2, math.floor(spec.bits)))


class _LiveBytes:
    """Peak bytes of tensors alive at once while the block runs (a torch dispatch mode)."""

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live, self.peak = 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        key = storage.data_ptr()
                        if key not in tracker.seen:
                            n = storage.nbytes()
                            tracker.seen.add(key)
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(t, tracker._free, key, n)
                return out

        self.seen = set()
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _free(self, key, n):
        if key in self.seen:
            self.seen.discard(key)
            self.live -= n

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        return False


def _h(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def markdown(est: Estimate, advice: list[str] | None = None) -> str:
    from quantune.report import markdown_table

    s = est.spec
    rows = [[line.name, _h(line.bytes), line.detail] for line in est.lines]
    rows.append(["**predicted peak (allocated)**", f"**{_h(est.peak_bytes)}**", f"at the {est.peak_phase}"])
    rows.append(["fragmentation margin", _h(est.fragmentation_bytes),
                 f"{FRAGMENTATION:.0%} the allocator may reserve beyond the allocated peak"])
    setting = (f"mode {s.mode}" + (f" ({s.method} {s.bits:g}-bit base)" if s.mode == "qlora" else "") +
               (f", LoRA r={s.lora_r}" if s.mode != "full" else "") +
               f", batch {s.batch_size} x {s.seq_len} tokens per GPU, {s.precision} autocast, parameters in "
               f"{s.param_dtype}, {s.optimizer}, gradient checkpointing {'on' if s.grad_checkpointing else 'off'}" +
               (f", {s.gpus} GPUs ({'FSDP' if s.fsdp else 'data parallel'})" if s.gpus > 1 else ""))
    states = sum(line.bytes for line in est.lines if line.name in ("weights", "gradients", "optimizer states",
                                                                     "trainable parameters (LoRA)"))
    text = (f"# Memory estimate: {est.model}\n\n{setting}. Parameters: {est.parameters:,}; trainable: "
            f"{est.trainable_parameters:,}. Figures are per GPU.\n\n"
            f"{markdown_table(['item', 'memory', 'how'], rows)}\n\n"
            f"Model states (weights, gradients, optimizer): {states / 1e9:.1f} GB ({_h(states)}), "
            f"{states / max(est.parameters, 1):.1f} bytes per parameter.\n")
    if advice:
        text += "\n" + "\n".join(f"- {line}" for line in advice) + "\n"
    text += ("\nActivations are traced at the real layer widths (eager execution; `--compile` usually needs "
             "less); the prediction is what torch.cuda.max_memory_allocated reports at the peak.\n")
    return text


def fits(est: Estimate, max_memory: float) -> bool:
    return est.peak_bytes + est.fragmentation_bytes <= max_memory


def fit_advice(config, est: Estimate, max_memory: float) -> list[str]:
    """Yes or no against ``max_memory`` bytes, and the settings that fit."""
    spec, need = est.spec, est.peak_bytes + est.fragmentation_bytes
    verdict = "yes" if need <= max_memory else "no"
    lines = [f"Fits in {_h(max_memory)}: {verdict} (needs {_h(need)} per GPU, margin included)."]
    best = largest_batch(config, spec, max_memory)
    if best and best != spec.batch_size:
        lines.append(f"Largest batch size that fits with these settings: {best}"
                     + (f" (use --grad-accum {math.ceil(spec.batch_size / best)} to keep the global batch)"
                        if best < spec.batch_size else "") + ".")
    if not spec.grad_checkpointing:
        with_ckpt = largest_batch(config, _replace(spec, grad_checkpointing=True), max_memory)
        if with_ckpt > best:
            lines.append(f"With --grad-checkpointing: batch size up to {with_ckpt}.")
    if not best and spec.mode == "lora":
        q = largest_batch(config, _replace(spec, mode="qlora", bits=4, grad_checkpointing=True), max_memory)
        if q:
            lines.append(f"LoRA on a 4-bit quantized base with checkpointing fits up to batch size {q}.")
    if not best and spec.grad_checkpointing and spec.mode == "full" and not spec.fsdp:
        lines.append("Consider LoRA (--mode lora), 8-bit AdamW (--optimizer adamw8bit) or FSDP over several GPUs.")
    return lines


def plan(model: str, spec: MemorySpec, max_memory: float | None = None) -> tuple[Estimate, list[str], object]:
    """Estimate for a model argument; a quantune-quantized folder sets the quantized base from
    its own quantization_config. Returns ``(estimate, advice lines, config)``."""
    config = load_config(model)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == "quantune":
        spec = _replace(spec, mode="qlora" if spec.mode != "full" else "full", method=qc.get("method", spec.method),
                        bits=qc.get("target_bits") or qc.get("bits", spec.bits), group_size=qc.get("group_size"))
        if spec.mode == "full":
            raise QuantuneError(f"{model} is quantized: full fine-tuning needs the original model")
    est = estimate(config, spec, model)
    advice = fit_advice(config, est, max_memory) if max_memory is not None else []
    return est, advice, config


def largest_batch(config, spec: MemorySpec, max_memory: float, limit: int = 4096) -> int:
    """The largest per-GPU batch size whose estimate fits in ``max_memory`` (0 if none)."""
    def ok(b):
        return fits(estimate(config, _replace(spec, batch_size=b)), max_memory)

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _replace(spec: MemorySpec, **kw) -> MemorySpec:
    d = asdict(spec)
    d.update(kw)
    return MemorySpec(**d)


def parse_size(text: str) -> float:
    """``24GiB``, ``80GB``, ``512MiB``, ``1.5TiB`` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in units or value <= 0:
        raise QuantuneError(f"cannot read memory size {text!r} (examples: 24GiB, 80GB, 512MiB)")
    return value * units[unit]
