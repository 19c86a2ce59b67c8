"""Save and load quantized model folders.

A folder holds ``config.json`` (with a versioned ``quantization_config``),
``model.safetensors`` (packed codes and metadata tensors, plus the float parameters kept in
full precision), the tokenizer files, ``report.json`` and ``report.md``. It is written to a
hidden temporary folder next to the target and renamed into place only when complete, so
a crash never leaves a folder that looks finished.

Loading goes through transformers' own ``AutoModelForCausalLM.from_pretrained`` with
quantune's registered quantizer (see :mod:`quantune.hf_integration`), after checks that
turn a missing, foreign, newer-version or corrupt folder into one clear error.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from quantune.config import QUANT_METHOD, QuantConfig, QuantuneError


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise QuantuneError(f"output folder {target} already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_files(model, tokenizer, config: QuantConfig, folder: Path) -> None:
    """Write config.json (with quantization_config), model.safetensors and the tokenizer."""
    model.config.quantization_config = config.to_dict()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def read_quant_config(folder: Path) -> QuantConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantuneError(f"quantized model folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise QuantuneError(f"{folder} has no config.json: not a model folder")
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config")
    except json.JSONDecodeError as exc:
        raise QuantuneError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise QuantuneError(f"{folder} is not a quantune-quantized folder (no quant_method '{QUANT_METHOD}')")
    return QuantConfig.from_dict(qc)


def check_safetensors(folder: Path) -> None:
    """Open every safetensors file of the folder once: safetensors validates the header and
    that the data section covers every tensor, so truncated or garbled files fail here with
    one clear line instead of deep inside transformers."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise QuantuneError(f"{folder} has no .safetensors weights")
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error types for bad headers/lengths
            raise QuantuneError(f"corrupt or truncated safetensors file {path}: "
                                f"{str(exc).strip() or type(exc).__name__}") from exc


def load(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype="auto"):
    """Rebuild a quantized model and its tokenizer from a folder written by quantune.

    ``dtype`` applies to the parameters kept in full precision ("auto": as stored); packed
    codes and their float16 metadata always keep their stored dtypes. Returns
    ``(model, tokenizer)``; the model is in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    read_quant_config(folder)
    check_safetensors(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except QuantuneError:
        raise
    except Exception as exc:  # shape mismatches, missing keys, ...: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantuneError(f"could not load {folder}: {first}") from exc
    return model.to(device).eval(), tokenizer
