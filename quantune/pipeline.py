"""End-to-end jobs behind the CLI: quantize a model and report, evaluate a model and report.

Each job returns its report as a dict and writes report files; none of them prints.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path

import torch

from eval.perplexity import evaluate_models, make_windows, needs_bos
from quantune import __version__
from quantune.config import FORMAT_VERSION, QuantConfig, QuantuneError
from quantune.data import load_text
from quantune.models import is_quantized_folder, load_model
from quantune.qlinear import QuantLinear, cached_weights
from quantune.quantize import quantize_model
from quantune.report import eval_markdown, quantize_markdown
from quantune.serialization import atomic_folder, load, save_model_files, write_text_atomic

log = logging.getLogger(__name__)


def check_finite_parameters(model) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise QuantuneError(f"parameter {name} of the input model holds NaN/Inf values")


def _header_bytes(path: Path) -> int:
    """Length of a safetensors file's JSON header (the little-endian u64 that starts the file)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _summary(model, result, folder: Path) -> dict:
    layers = result.layers.values()
    q_params = sum(L["shape"][0] * L["shape"][1] for L in layers)
    q_bits = sum(L["bits_per_weight"] * L["shape"][0] * L["shape"][1] for L in layers)
    fp_params = sum(p.numel() for p in model.parameters())  # bias of QuantLinear included
    files = sorted(folder.glob("*.safetensors"))
    data_bytes = sum(p.stat().st_size - 8 - _header_bytes(p) for p in files)
    worst = max(result.layers.items(), key=lambda kv: kv[1]["rel_error"])
    return {
        "quantized_layers": len(result.layers),
        "quantized_params": q_params,
        "full_precision_params": fp_params,
        "bpw_quantized_layers": q_bits / q_params,
        "bpw_whole_model": 8 * data_bytes / (q_params + fp_params),
        "mean_rel_error": (sum(L["rel_error"] ** 2 * L["shape"][0] * L["shape"][1] for L in layers) / q_params) ** 0.5,
        "max_rel_error": worst[1]["rel_error"],
        "worst_layer": worst[0],
        "file_bytes": sum(p.stat().st_size for p in files),
        "quantize_seconds": result.seconds,
    }


def run_quantize(model_spec: str, cfg: QuantConfig, out_dir: str | Path, *, eval_data: str | None = "builtin",
                 seq_len: int = 2048, windows: int | None = 8, overwrite: bool = False,
                 trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                 progress: bool = True, stream: bool = False, device: str = "cpu") -> dict:
    """Load, quantize, evaluate (original vs quantized) and save ``model_spec`` to ``out_dir``.

    Quantization always works on float32 weights; ``dtype`` is the dtype in which the
    parameters kept in full precision (embeddings, norms, head, biases) are stored and run.
    The original is evaluated in float32.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise QuantuneError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantuneError(f"--device {device} asked for, but no CUDA GPU is available")
    text = load_text(eval_data) if eval_data else None  # fail on bad data before the long work
    if stream:
        return _run_quantize_streamed(model_spec, cfg, out_dir, text, seq_len, windows, overwrite,
                                      trust_remote_code, dtype, progress, device, start)
    model, tokenizer, name = load_model(model_spec, trust_remote_code=trust_remote_code)
    check_finite_parameters(model)
    win = protocol = reference = None
    if text is not None:
        win, protocol = make_windows(tokenizer, text[0], seq_len, windows, bos=needs_bos(model, tokenizer),
                                     text_name=text[1])
        reference = copy.deepcopy(model)
    if device != "cpu":
        model.to(device)
    result = quantize_model(model, cfg, progress=progress)
    model.to("cpu")
    if dtype != torch.float32:
        for param in model.parameters():  # tied parameters are listed once
            param.data = param.data.to(dtype)
    report = {
        "quantune_version": __version__, "format_version": FORMAT_VERSION, "model": name,
        "architecture": type(model).__name__, "config": result.config.to_dict(),
        "full_precision_dtype": str(dtype).removeprefix("torch."),
        "full_precision": result.full_precision, "layers": result.layers,
    }
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        save_model_files(model, tokenizer, result.config, tmp)
        _finish_report(report, tmp, model, result, reference, win, protocol, progress, start, device)
    return report


def _finish_report(report, folder: Path, quantized, result, original, win, protocol, progress, start,
                   device: str = "cpu") -> None:
    """Evaluate original vs quantized (when a protocol is given) on ``device`` and write report.json / report.md."""
    if protocol is not None:
        dev = torch.device(device)
        if dev.type != "cpu":  # evaluated where they were quantized (the files are written by now)
            original.to(dev)
            quantized.to(dev)
        with _eval_weights(quantized, dev):
            results = evaluate_models({"original": original, "quantized": quantized}, win,
                                      reference=original, progress=progress)
        report["eval"] = {"protocol": protocol.describe(), "protocol_fields": protocol.__dict__,
                          "device": device_name(dev), "results": {k: v.to_dict() for k, v in results.items()}}
    report["summary"] = _summary(quantized, result, folder)
    report["summary"]["total_seconds"] = time.perf_counter() - start
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text(quantize_markdown(report))


def _run_quantize_streamed(model_spec, cfg, out_dir, text, seq_len, windows, overwrite, trust_remote_code, dtype,
                           progress, device, start) -> dict:
    """``quantize --stream``: tensor by tensor from the safetensors shards (quantune.stream)."""
    from quantune.models import resolve_model
    from quantune.stream import quantize_checkpoint

    source, kwargs = resolve_model(model_spec)
    if kwargs or not Path(source).is_dir():
        raise QuantuneError("--stream reads safetensors shards: MODEL must be a local Hugging Face folder or a "
                            "built-in name (not a .gguf file or a hub id)")
    report = {"quantune_version": __version__, "format_version": FORMAT_VERSION, "model": model_spec,
              "streamed": True, "full_precision_dtype": str(dtype).removeprefix("torch.")}

    def finish(folder: Path, result) -> None:
        quantized, tokenizer = load(folder)
        report.update(architecture=type(quantized).__name__, config=result.config.to_dict(),
                      full_precision=result.full_precision, layers=result.layers)
        original = win = protocol = None
        if text is not None:
            original, _, _ = load_model(model_spec, trust_remote_code=trust_remote_code)
            win, protocol = make_windows(tokenizer, text[0], seq_len, windows, bos=needs_bos(original, tokenizer),
                                         text_name=text[1])
        _finish_report(report, folder, quantized, result, original, win, protocol, progress, start, device)

    quantize_checkpoint(source, out_dir, cfg, device=device, dtype=dtype, overwrite=overwrite,
                        trust_remote_code=trust_remote_code, progress=progress, finish=finish)
    return report


def load_any(spec: str, trust_remote_code: bool = False, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None):
    """A quantized folder through :func:`quantune.load` (its full-precision parameters in ``dtype``, None: as
    stored), anything else as a float model in ``dtype`` (None: float32); on ``device``."""
    path = Path(spec)
    if path.is_dir() and is_quantized_folder(path):
        return load(path, device=device, dtype=dtype or "auto")
    model, tokenizer, _ = load_model(spec, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer


def _float_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def device_name(device: torch.device) -> str:
    """What a report calls the device it ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _eval_weights(model, device: torch.device):
    """On the CPU every quantized layer's weight is decoded once for the evaluation (one float copy, far faster
    than decoding per window); on a GPU the layers run as they do in use: decoded per call in float32, through
    the prefill kernels in bf16 / float16 (:class:`~quantune.qlinear.QuantLinear`), with no copy held."""
    if device.type == "cpu":
        return cached_weights(model)
    return contextlib.nullcontext(model)


def run_eval(model_spec: str, *, data: str = "builtin", reference: str | None = None, seq_len: int = 2048,
             windows: int | None = None, report_dir: str | Path | None = None, bos: bool | None = None,
             adapter: str | Path | None = None, progress: bool = True, device: str = "cpu",
             dtype: torch.dtype | None = None) -> dict:
    """Perplexity (and KL / top-1 agreement against ``reference``) of a model on a text, run on ``device``
    ("auto": a CUDA GPU if there is one) with the full-precision parameters (and, for a float model, every
    parameter) in ``dtype`` (None: a quantized folder's as stored, a float model's float32); a quantized
    model's weights keep their stored format."""
    from quantune.finetune import resolve_device

    start = time.perf_counter()
    dev = resolve_device(device)
    text, text_name = load_text(data)
    model, tokenizer = load_any(model_spec, device=dev, dtype=dtype)
    if adapter is not None:
        from quantune.lora import load_adapter

        model = load_adapter(model, adapter).to(dev)
    bos = needs_bos(model, tokenizer) if bos is None else bos
    win, protocol = make_windows(tokenizer, text, seq_len, windows, bos=bos, text_name=text_name)
    ref_model = load_any(reference, device=dev, dtype=dtype)[0] if reference else None
    with _eval_weights(model, dev):
        name = f"{model_spec} + {adapter}" if adapter else model_spec
        results = evaluate_models({name: model}, win, reference=ref_model, progress=progress)
    report = {
        "quantune_version": __version__, "model": model_spec, "adapter": str(adapter) if adapter else None,
        "reference": reference,
        "quantized": any(isinstance(m, QuantLinear) for m in model.modules()),
        "protocol": protocol.describe(), "protocol_fields": protocol.__dict__,
        "device": device_name(dev), "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "results": {k: v.to_dict() for k, v in results.items()}, "seconds": time.perf_counter() - start,
    }
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(report_dir / "eval_report.json", json.dumps(report, indent=2))
        write_text_atomic(report_dir / "eval_report.md", eval_markdown(report))
    return report


def load_for_generation(model_spec: str, *, device: str = "auto", dtype: torch.dtype | None = None,
                        adapter: str | Path | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer, info)`` for :func:`run_generate`: a quantized folder or any model argument on
    ``device`` ("auto": a CUDA GPU if there is one), its full-precision parameters in ``dtype`` (None:
    bfloat16 on a GPU, float32 on the CPU), with a LoRA ``adapter`` on top if given."""
    from quantune.finetune import resolve_device

    dev = resolve_device(device)
    torch_dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    path = Path(model_spec)
    quantized = path.is_dir() and is_quantized_folder(path)
    model, tokenizer = load_any(model_spec, trust_remote_code, device=dev, dtype=torch_dtype)
    if adapter is not None:
        from quantune.lora import load_adapter

        model = load_adapter(model, adapter).eval()
    info = {"model": model_spec, "adapter": str(adapter) if adapter else None, "quantized": quantized,
            "device_name": device_name(dev),
            "dtype": str(torch_dtype).removeprefix("torch.")}
    return model, tokenizer, info


def run_generate(model_spec: str, prompt: str, *, max_new_tokens: int = 64, device: str = "auto",
                 mode: str = "auto", dtype: torch.dtype | None = None, adapter: str | Path | None = None, stop: bool = True,
                 trust_remote_code: bool = False) -> dict:
    """Greedy continuation of ``prompt`` by a model (a quantized folder or any model argument; see
    :func:`load_for_generation`), with the timings of :func:`quantune.generate.greedy_generate`.
    Returns a JSON-ready dict."""
    from quantune.finetune import resolve_device
    from quantune.generate import greedy_generate, resolve_mode

    mode = resolve_mode(mode, resolve_device(device))  # a bad mode or device fails before the model loads
    if not prompt:
        raise QuantuneError("the prompt is empty")
    model, tokenizer, info = load_for_generation(model_spec, device=device, dtype=dtype, adapter=adapter,
                                                 trust_remote_code=trust_remote_code)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise QuantuneError("the prompt tokenizes to no tokens")
    eos = None
    if stop:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
    # no kernels off the GPU: decode each quantized weight once rather than in every step
    with cached_weights(model, getattr(torch, info["dtype"])) if info["quantized"] and model.device.type != "cuda" \
            else contextlib.nullcontext():
        result = greedy_generate(model, ids, max_new_tokens, mode=mode, eos_token_id=eos)
    return {"quantune_version": __version__, **info, "prompt": prompt,
            "text": tokenizer.decode(result.tokens, skip_special_tokens=True), **result.to_dict()}
