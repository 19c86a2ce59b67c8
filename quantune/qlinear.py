"""QuantLinear: the one quantized Linear module.

It holds a method's packed buffers (codes plus small metadata, see
:mod:`quantune.methods`) and an optional float bias, and computes

    y = x W_hat^T + b,   W_hat = dequantize(buffers)

with a reference PyTorch path: decode the weight, then one GEMM. For kashin,
``W_hat = U + V Q^T`` row by row, which equals ``y = x C_u[idx]^T + (x Q) C_v[idx]^T``.
On CUDA without autograd, Triton kernels serve it (:mod:`quantune.kernels`: a GEMV for up to 16
tokens, a bf16 decode plus cuBLAS for more); under ``torch.compile`` the layer is one custom op
(``quantune::linear``), so a compiled model has no graph break at its quantized layers.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from quantune.config import QuantConfig, QuantuneError
from quantune.methods import assert_finite, bits_per_weight, get_method


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, qconfig: QuantConfig,
                 device=None, bias_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.qconfig = in_features, out_features, qconfig
        self.method = get_method(qconfig.method)
        self.buffer_names = []
        for name, (shape, dtype) in self.method.buffer_specs(out_features, in_features, qconfig).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
            self.buffer_names.append(name)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self._weight_cache: torch.Tensor | None = None
        self._launch_bytes: int | None = None  # codes of the layers launched with this one (colocate)
        self._reset_kernel_caches()
        self._register()

    def _reset_kernel_caches(self):
        self._bitplane = None  # BitplaneForm (float32 plane coefficients), built on first use
        self._levels = None    # its level tables (quantune.kernels.level_tables), likewise
        self._kform = None     # what the kernel path passes: see kernel_form / kernel_tables
        self._ktables = None
        self._support = None   # which kernels serve it, with the form it was read from: see _kernel_support

    def _apply(self, fn, recurse=True):
        """Device moves apply to the stored buffers; dtype casts do not. ``model.to(torch.bfloat16)``,
        ``.half()`` or ``.float()`` would otherwise round the float16 scales and coefficients (changing
        the quantized weights) or double their memory; the bias follows the cast like any parameter.
        The buffers go through ``fn`` as integers of their width, so every bit is kept."""
        floats = {}
        codes = self._buffers.get("codes")
        for name in self.buffer_names:
            t = self._buffers.get(name)
            if t is not None and t.is_floating_point():
                floats[name] = t.dtype
                self._buffers[name] = t.view(_SAME_WIDTH_INT[t.element_size()])
        try:
            super()._apply(fn, recurse)
        finally:
            for name, dtype in floats.items():
                self._buffers[name] = self._buffers[name].view(dtype)
        self._reset_kernel_caches()  # the kernels' copies and views belong to the old buffers
        if self._buffers.get("codes") is not codes:  # moved one by one: no longer back to back (see colocate)
            self._launch_bytes = None
        return self

    def _register(self):
        """A handle through which torch.compile'd code reaches this module (see :func:`_linear_op`)."""
        self._handle = next(_HANDLES)
        _MODULES[self._handle] = self

    def __setstate__(self, state):  # copies (copy.deepcopy) get their own handle
        super().__setstate__(state)
        self._register()

    @classmethod
    def from_linear(cls, linear: nn.Linear, qconfig: QuantConfig, name: str = "") -> tuple["QuantLinear", dict]:
        """Quantize ``linear``; returns the module and per-layer stats."""
        if not isinstance(linear, nn.Linear):
            raise QuantuneError(f"unsupported layer {name or '?'}: {type(linear).__name__}; quantune quantizes torch.nn.Linear")
        w = linear.weight.detach()
        assert_finite(name or "layer", w)
        start = time.perf_counter()
        buffers, stats = get_method(qconfig.method).quantize(w.float(), qconfig)
        for key, value in buffers.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise QuantuneError(f"weights of {name or 'layer'} overflow the float16 {key} of the "
                                    f"{qconfig.method} format (|w| up to {float(w.abs().max()):.3g})")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, qconfig,
                     device=w.device, bias_dtype=w.dtype)
        for key, value in buffers.items():
            getattr(module, key).copy_(value)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        w_hat = module.dequantize()
        stats.update(
            shape=[linear.out_features, linear.in_features],
            rel_error=float((w_hat - w.float()).norm() / w.float().norm().clamp(min=1e-30)),
            bits_per_weight=bits_per_weight(buffers, linear.out_features, linear.in_features, qconfig),
            seconds=time.perf_counter() - start,
        )
        return module, stats

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes; peft looks for this name to place adapters on a quantized layer's device."""
        return self.codes

    def buffers_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.buffer_names}

    @torch.compiler.disable  # compiled layers call the decode as is (no tracing through FFTs and caches)
    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(out, in)`` this module computes with."""
        return self.method.dequantize(self.buffers_dict(), self.out_features, self.in_features, self.qconfig)

    def decoded_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self._weight_cache if self._weight_cache is not None else self.dequantize()
        return w.to(dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._reset_kernel_caches()  # new codes (copied in place: colocated layers stay back to back)
        return super()._load_from_state_dict(*args, **kwargs)

    def bitplane_form(self):
        """The layer as :class:`quantune.methods.BitplaneForm`, with its float32 plane coefficients."""
        if self._bitplane is None or self._bitplane.a.device != self.codes.device:
            self._bitplane = self.method.bitplane_form(self.buffers_dict(), self.out_features, self.in_features,
                                                       self.qconfig)
            self._levels = None
        return self._bitplane

    def level_tables(self):
        """:func:`quantune.kernels.level_tables`: an affine format's stored scales (and offsets) themselves,
        else each (row, group)'s float32 table of the values each factor's code field decodes to."""
        if self._levels is None:
            self._levels = self.method.affine_tables(self.buffers_dict(), self.qconfig)
            if self._levels is None:  # from a float32 form built for this only (not kept)
                from quantune.kernels import level_tables

                self._levels = level_tables(self._planes(), self.qconfig.bits)
        return self._levels

    def _planes(self):
        """The float32 form: :meth:`bitplane_form`'s if already built, else one built for this use only."""
        return self._bitplane or self.method.bitplane_form(self.buffers_dict(), self.out_features,
                                                           self.in_features, self.qconfig)

    def _affine(self) -> bool:
        return self.method.affine_tables(self.buffers_dict(), self.qconfig) is not None

    def kernel_form(self):
        """The form the kernel path passes, holding no float32 copy of what is stored where the kernels can do
        without: for an affine format (rtn) no planes (its kernels read the level tables, the stored float16
        scales); for kashin the stored float16 coefficients as ``c`` (:data:`quantune.kernels.HALF_COEFFS`),
        except at 1 or 2 bits in partial words, whose kernel takes the float32 planes (:meth:`bitplane_form`), and
        at 4 bits with one group a row where the GEMV runs in one pass over this layer's codes, or over those of
        the layers :func:`colocate` launches with it (:func:`quantune.kernels.keeps_planes`: measured faster).
        Before, every layer kept the float32 planes: 3 bits per weight at groups of 64."""
        if self._kform is None or (self._kform.a is not None and self._kform.a.device != self.codes.device):
            from quantune import kernels

            form = self._planes()
            if self._affine():  # the form keeps its layout only
                self._kform = dataclasses.replace(form, a=None, bx=None, bq=None)
            elif (kernels.HALF_COEFFS and "coeffs" in self.buffer_names
                  and (self.qconfig.bits > 2 or kernels.gemv_supported(form, self.qconfig.bits, self.codes.shape[1]))
                  and not kernels.keeps_planes(form, self.qconfig.bits, self._launch_bytes
                                               or self.codes.numel() * self.codes.element_size())):
                # the word-reading kernels read c; other widths' kernel reads the level tables (the bit-plane
                # kernel of 1 and 2 bits in partial words takes the float32 planes: those keep them)
                c = self.coeffs.view(self.out_features, form.groups, self.qconfig.bits)
                self._kform = dataclasses.replace(form, a=None, bx=None, bq=None, c=c)
            else:
                self._kform = self.bitplane_form()
        return self._kform

    def kernel_tables(self) -> tuple:
        """The level tables the kernel path passes: an affine format's (its stored scales and minima); for
        kashin in whole 32-bit words ``(None, None, False)``, since its kernels read the coefficients through
        :meth:`kernel_form`; float32 tables only for the other widths, whose level-table kernel reads them (at 4
        bits they would hold 2.5 bits per weight at groups of 128, 5 at 64)."""
        if self._ktables is None:
            from quantune.kernels import gemv_supported

            if self._affine() or not gemv_supported(self.kernel_form(), self.qconfig.bits, self.codes.shape[1]):
                self._ktables = self.level_tables()
            else:
                self._ktables = (None, None, False)
        return self._ktables

    def _kernel_support(self) -> tuple[bool, bool, int]:
        """Whether Triton kernels serve this layer's format, (few tokens, many tokens, the most tokens the
        few-token kernel takes), kept with the form they were read from (a new form, after a load or
        :func:`colocate`, is read again)."""
        form = self.kernel_form()
        if self._support is None or self._support[0] is not form:
            from quantune import kernels

            gemv = kernels.available() and kernels.gemv_supported(form, self.qconfig.bits, self.codes.shape[1])
            few = gemv or (kernels.available() and kernels.block_k_for(form.group) is not None)
            self._support = (form, few, gemv, kernels.MAX_TOKENS)
        return self._support[1:]

    def _kernel_path(self, x: torch.Tensor) -> str | None:
        """Which Triton path serves this input on CUDA (no cached weight, no gradient): "fused" for
        few tokens (decode), "prefill" (bf16 factors decoded at memory speed, then cuBLAS) for more."""
        if not x.is_cuda or self._weight_cache is not None or (torch.is_grad_enabled() and x.requires_grad):
            return None
        few, gemv, max_tokens = self._kernel_support()
        if x.numel() // self.in_features <= max_tokens:
            return "fused" if few else None
        half = _compute_dtype(x) in (torch.bfloat16, torch.float16)  # float32 keeps the float32 decode
        return "prefill" if half and gemv else None

    def _kernel_forward(self, x: torch.Tensor, share: bool = True) -> torch.Tensor | None:
        """``x W^T`` (no bias) through a Triton kernel when one serves ``x`` (see :meth:`_kernel_path`),
        else None. ``share``: reuse the input's preparation across layers (see
        :func:`quantune.kernels.prepared_input`). Compiled code reaches it through ``quantune::linear``
        (see :meth:`forward`), never by tracing."""
        path = self._kernel_path(x)
        if path is None:
            return None
        if x.device.index is not None and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):  # Triton launches on the current device (models split over GPUs)
                return self._kernel_forward(x, share)
        from quantune.kernels import fused_matmul, prefill_matmul

        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, self.in_features)
        if path == "fused":
            y = fused_matmul(x2, self.codes, self.kernel_form(), self.qconfig.bits, self.kernel_tables(),
                             out_dtype=dtype, share=share)
        else:
            y = prefill_matmul(x2.to(dtype), self.codes, self.kernel_form(), self.qconfig.bits,
                               tables=self.kernel_tables())
        if y.dtype != dtype:
            y = y.to(dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _inference_forward(self, x: torch.Tensor, share: bool = True) -> torch.Tensor:
        """``x W^T + b`` without autograd: a Triton kernel on CUDA where one serves ``x``, else the
        decoded weight and one GEMM."""
        if x.is_cuda:
            y = self._kernel_forward(x, share=share)
            if y is not None:
                return y if self.bias is None else y + self.bias.to(y.dtype)
        dtype = _compute_dtype(x)
        return F.linear(x.to(dtype), self.decoded_weight(dtype), None if self.bias is None else self.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_cache is not None:  # one decoded copy: a plain linear (autograd keeps only x)
            w = self._weight_cache
            if not torch.is_autocast_enabled(x.device.type) and w.dtype != x.dtype:
                w = w.to(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(w.dtype))
        if not (torch.is_grad_enabled() and x.requires_grad):
            if torch.compiler.is_compiling():  # one opaque op in the graph: no graph break
                return torch.ops.quantune.linear(x, self.codes, self.bias, self._handle, self.out_features)
            return self._inference_forward(x)
        y = _DecodedMatmul.apply(x, self)  # keeps no decoded weight alive for the backward pass
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        c = self.qconfig
        return f"in_features={self.in_features}, out_features={self.out_features}, method={c.method}, bits={c.bits}"


_HANDLES = itertools.count()
_MODULES: "weakref.WeakValueDictionary[int, QuantLinear]" = weakref.WeakValueDictionary()


@torch.library.custom_op("quantune::linear", mutates_args=())
def _linear_op(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, handle: int,
               out_features: int) -> torch.Tensor:
    """``x W^T + b`` of the QuantLinear behind ``handle`` (its ``codes`` and bias passed along so the
    graph depends on them; the same arithmetic as its uncompiled forward), for torch.compile: the layer is one opaque op in the captured graph instead of a graph
    break, so the code around it compiles into one graph (and CUDA graphs capture it whole). Its input
    may live in memory that compiled kernels rewrite without a version bump, so nothing is shared
    between layers here: each call prepares its own input."""
    return _module(handle, codes)._inference_forward(x, share=False)


@_linear_op.register_fake
def _linear_op_fake(x, codes, bias, handle, out_features):
    return x.new_empty((*x.shape[:-1], out_features), dtype=_compute_dtype(x))


@torch.library.custom_op("quantune::linear_shared", mutates_args=())
def _linear_shared_op(x: torch.Tensor, codes: list[torch.Tensor], bias: list[torch.Tensor | None],
                      handles: list[int], out_features: list[int]) -> list[torch.Tensor]:
    """``quantune::linear`` of several layers that read the same input (q/k/v, gate/up), preparing
    that input once for all of them: the preparation is cached for the length of this call only
    (made from single-layer ops by :class:`quantune.compiler.ShareInputs`)."""
    from quantune import kernels

    modules = [_module(h, c) for h, c in zip(handles, codes)]
    kernels._PREPARED.clear()  # nothing from outside this call can match
    try:
        ys = _joined_forward(modules, x)
        return ys if ys is not None else [m._inference_forward(x, share=True) for m in modules]
    finally:
        kernels._PREPARED.clear()  # x's memory may be rewritten once the call returns


@_linear_shared_op.register_fake
def _linear_shared_op_fake(x, codes, bias, handles, out_features):
    return [x.new_empty((*x.shape[:-1], n), dtype=_compute_dtype(x)) for n in out_features]


def colocate(modules: list[QuantLinear]) -> None:
    """Store the codes of layers with the same input width and format back to back, one row block
    each (and likewise their stored scales or coefficients, and any float32 planes or level tables the
    kernels read), so that layers which
    read the same input (q/k/v, gate/up) run as one GEMV launch with one result each (see
    :func:`_joined_forward`). The modules keep their own tensors, now views into shared storage:
    the same values, the same memory. Modules that do not match the first are refused."""
    if len(modules) < 2:
        return
    first = modules[0]
    for m in modules[1:]:
        if (m.in_features, m.qconfig, m.codes.device, m.codes.dtype) != \
                (first.in_features, first.qconfig, first.codes.device, first.codes.dtype):
            raise QuantuneError(f"colocate: layers differ in input width, format or device "
                                f"({first.extra_repr()} vs {m.extra_repr()})")
    rows = [m.out_features for m in modules]

    def split(joined: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(joined, rows))

    with torch.no_grad():
        for name in first.buffer_names:  # codes, and the scales or coefficients the kernels read in place
            parts = [getattr(m, name) for m in modules]
            for m, t in zip(modules, torch.split(torch.cat(parts), [p.shape[0] for p in parts])):
                setattr(m, name, t)  # a registered buffer: setattr replaces it
        launch_bytes = sum(m.codes.numel() * m.codes.element_size() for m in modules)
        for m in modules:
            m._reset_kernel_caches()  # forms and tables of the new views
            m._launch_bytes = launch_bytes  # the joined launch's codes decide its form (kernels.keeps_planes)
        forms = [m.kernel_form() for m in modules]
        tables = [m.kernel_tables() for m in modules]
        if forms[0].a is not None:  # the kernels read float32 planes: back to back as well
            parts = {f: split(torch.cat([getattr(fm, f) for fm in forms])) for f in ("a", "bx", "bq")}
            for i, m in enumerate(modules):
                m._bitplane = m._kform = dataclasses.replace(forms[i], a=parts["a"][i], bx=parts["bx"][i],
                                                             bq=parts["bq"][i])
        # tables the kernels read, back to back: rtn's are its scales and minima (or None: the symmetric grid's
        # offsets), joined above; level tables of other widths are joined here. The layers share the format, so
        # all or none have each
        tparts = [[t[i] for t in tables] if tables[0][i] is None or _back_to_back([t[i] for t in tables]) is not None
                  else split(torch.cat([t[i] for t in tables])) for i in (0, 1)]
        for i, m in enumerate(modules):
            m._ktables = (tparts[0][i], tparts[1][i], tables[i][2])


def colocate_siblings(model: nn.Module) -> int:
    """:func:`colocate` each run of consecutive QuantLinear children (in declaration order) of every
    module that share input width, format and device: q/k/v/o of an attention block, gate/up of an
    MLP. Returns the number of runs."""
    def key(child):
        return (child.in_features, child.qconfig, child.codes.device) if isinstance(child, QuantLinear) else None

    runs = 0
    for parent in model.modules():
        for k, group in itertools.groupby(parent.children(), key):
            group = list(group)
            if k is not None and len(group) > 1:
                colocate(group)
                runs += 1
    return runs


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _back_to_back(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over ``tensors`` when they are contiguous row blocks of one storage, in order."""
    first = tensors[0]
    end = first.data_ptr()
    for t in tensors:
        if (not t.is_contiguous() or t.data_ptr() != end or t.shape[1:] != first.shape[1:]
                or t.dtype != first.dtype or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        end += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _joined_forward(modules: list[QuantLinear], x: torch.Tensor) -> list[torch.Tensor] | None:
    """The outputs of 2 or 3 layers that read ``x`` from one GEMV launch, when :func:`colocate` put
    their codes, coefficients and tables back to back and the few-token kernel serves ``x``; else None."""
    if len(modules) not in (2, 3) or any(m.qconfig != modules[0].qconfig or m.in_features != modules[0].in_features
                                         for m in modules):
        return None
    if any(m._kernel_path(x) != "fused" for m in modules):
        return None
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device (see QuantLinear._kernel_forward)
            return _joined_forward(modules, x)
    forms = [m.kernel_form() for m in modules]
    tables = [m.kernel_tables() for m in modules]
    codes = _back_to_back([m.codes for m in modules])
    joined = {f: _back_to_back([getattr(fm, f) for fm in forms]) for f in ("a", "bx", "bq", "c")
              if getattr(forms[0], f) is not None}
    jt = [None if tables[0][i] is None else _back_to_back([t[i] for t in tables]) for i in (0, 1)]
    if codes is None or any(v is None for v in joined.values()) or \
            any((jt[i] is None) != (tables[0][i] is None) for i in (0, 1)):
        return None
    from quantune.kernels import fused_matmul

    dtype = _compute_dtype(x)
    x2 = x.reshape(-1, modules[0].in_features)
    folds = forms[0].folds  # a plane folds in the joined launch only where it folds in every layer
    for fm in forms[1:]:
        folds &= fm.folds
    form = dataclasses.replace(forms[0], **joined, folds=folds)
    ys = fused_matmul(x2, codes, form, modules[0].qconfig.bits, (jt[0], jt[1], tables[0][2]), out_dtype=dtype,
                      share=True, outputs=tuple(m.out_features for m in modules))
    if ys is None:
        return None
    out = []
    for m, y in zip(modules, ys):
        y = y.to(dtype).reshape(*x.shape[:-1], m.out_features)
        out.append(y if m.bias is None else y + m.bias.to(y.dtype))
    return out


def _module(handle: int, codes: torch.Tensor) -> "QuantLinear":
    module = _MODULES.get(handle)
    if module is None or module.codes.data_ptr() != codes.data_ptr():
        raise QuantuneError(f"quantune::linear: no quantized layer behind handle {handle} for these codes "
                            "(compiled code outlived its model?)")
    return module


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _DecodedMatmul(torch.autograd.Function):
    """y = x W^T for a frozen quantized W, decoding W again in the backward pass instead of
    saving it (the way QLoRA's 4-bit matmul keeps activation memory to the inputs alone).
    The base weight never gets a gradient; only x does."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.dtype, ctx.x_dtype = module, _compute_dtype(x), x.dtype
        return F.linear(x.to(ctx.dtype), module.decoded_weight(ctx.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.module.decoded_weight(ctx.dtype)
        return (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype), None


@contextmanager
def cached_weights(model: nn.Module, dtype: torch.dtype = torch.float32):
    """Decode every QuantLinear's weight once for the duration (fast repeated evaluation or
    training at the cost of one decoded copy of the weights in ``dtype``)."""
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        for m in modules:
            m._weight_cache = m.dequantize().to(dtype)
        yield model
    finally:
        for m in modules:
            m._weight_cache = None
