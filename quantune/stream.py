"""Quantize a checkpoint tensor by tensor, straight from its safetensors shards.

The model is never instantiated with weights: its architecture is built on the meta device
only to decide which Linear layers to quantize (the same plan as :func:`quantune.quantize.
plan_modules`). Each shard is read one tensor at a time; a target weight is moved to
``device``, quantized, and its packed buffers written to the output shard of the same name;
every other tensor is copied (cast to ``dtype`` when given). Peak memory is one output
shard on the host plus a small multiple of the largest tensor on ``device``. The result is
the same folder layout as the in-memory path and loads with :func:`quantune.load`.

With :data:`OVERLAP`, reading and writing run beside the arithmetic: a thread reads the next
tensor of the shard while the current one is quantized, and another writes a finished output
shard while the next shard is quantized (one more output shard on the host at most). The
arithmetic and its order are unchanged, so the files are byte for byte those of the plain
loop. Off until timed on the GPU (eval/bench_quantize.py runs both); meant for GPUs, where the
CPU's cores are free while the device computes (on the CPU the arithmetic uses every core).
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantune.config import QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import QuantizeResult, plan_modules
from quantune.serialization import atomic_folder

INDEX = "model.safetensors.index.json"
# read the next tensor and write the last shard while the current tensor is quantized: True / False everywhere, or
# None where the arithmetic runs on a GPU. False until the device has timed it (bench_quantize: both in one run); a
# reader thread that holds the GIL while it copies could also starve the launches of the arithmetic
OVERLAP: bool | None = False
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
           "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder (sharded with an index, or one file)."""
    index = folder / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise QuantuneError(f"{folder} has no model.safetensors or {INDEX}: streaming needs safetensors weights")


def meta_model(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model


def quantize_checkpoint(src: str | Path, out: str | Path, cfg: QuantConfig, *, device: str = "cpu",
                        dtype: torch.dtype | None = torch.float32, overwrite: bool = False,
                        trust_remote_code: bool = False, progress: bool = True, finish=None) -> QuantizeResult:
    """Quantize the Hugging Face folder ``src`` into ``out`` without loading the model.

    ``finish(folder, result)``, if given, runs on the complete temporary folder before it is
    renamed into place (reports, evaluation), so a crash there leaves no finished-looking folder.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if cfg.target_bits is not None and cfg.target_bits != int(cfg.target_bits):
        raise QuantuneError("streaming quantization does not mix widths yet; use the in-memory path for --bits "
                            f"{cfg.target_bits}")
    if out.exists() and not overwrite:
        raise QuantuneError(f"output folder {out} already exists (pass --overwrite to replace it)")
    config, model = meta_model(src, trust_remote_code)
    targets, kept = plan_modules(model, cfg)
    shapes = {name: (model.get_submodule(name).out_features, model.get_submodule(name).in_features)
              for name in targets}
    del model
    result = QuantizeResult(config=cfg.replace(modules_in_full_precision=kept), full_precision=kept)
    remaining = set(targets)
    weight_map, total = {}, 0
    shards = checkpoint_shards(src)
    bar = tqdm(total=len(targets), desc=f"quantizing ({cfg.method}, {cfg.bits}-bit, streamed)", unit="layer",
               disable=not progress)
    writing = None  # the last shard's write, running beside the next shard's arithmetic (OVERLAP)
    overlap = torch.device(device).type != "cpu" if OVERLAP is None else OVERLAP
    with atomic_folder(out, overwrite=overwrite) as tmp, ThreadPoolExecutor(1) as writer:
        for shard in shards:
            tensors = {}
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key, tensor in _read_ahead(f, list(f.keys()), overlap):
                    name = key.removesuffix(".weight")
                    if key.endswith(".weight") and name in remaining:
                        if tuple(tensor.shape) != shapes[name]:
                            raise QuantuneError(f"{key} has shape {tuple(tensor.shape)}, but the config makes "
                                                f"{name} {shapes[name][0]}x{shapes[name][1]}")
                        linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta")
                        linear.weight = nn.Parameter(tensor.to(device), requires_grad=False)
                        module, stats = QuantLinear.from_linear(linear, result.config.for_module(name), name)
                        stats["bits"] = module.qconfig.bits
                        result.layers[name] = stats
                        for buf_name, buf in module.buffers_dict().items():
                            tensors[f"{name}.{buf_name}"] = buf.cpu().contiguous()
                        remaining.discard(name)
                        bar.update()
                    else:
                        if dtype is not None and tensor.is_floating_point():
                            tensor = tensor.to(dtype)
                        tensors[key] = tensor.contiguous()
            if writing is not None:
                writing.result()  # one shard in flight at most; an error surfaces here
            if overlap:
                writing = writer.submit(save_file, tensors, str(tmp / shard.name), metadata={"format": "pt"})
            else:
                save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            for key, tensor in tensors.items():
                weight_map[key] = shard.name
                total += tensor.numel() * tensor.element_size()
        if writing is not None:
            writing.result()
        bar.close()
        if remaining:
            missing = sorted(remaining)
            raise QuantuneError(f"the checkpoint has no tensor {missing[0]}.weight (and {len(missing) - 1} more): "
                                "its tensor names do not match the model's modules; use the in-memory path")
        if len(shards) > 1:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        config_dict = config.to_dict()
        config_dict["quantization_config"] = result.config.to_dict()
        if dtype is not None:
            config_dict["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2))
        for name in _COPIED:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        result.layers = {name: result.layers[name] for name in targets}  # module order
        result.seconds = time.perf_counter() - start
        if finish is not None:
            finish(tmp, result)
    return result


def _read_ahead(f, keys: list[str], overlap: bool):
    """``(key, tensor)`` for each of ``keys`` of the open safetensors file ``f``, in order; with ``overlap``
    each next tensor is read by a thread while the caller works on the current one."""
    if not overlap:
        for key in keys:
            yield key, f.get_tensor(key)
        return
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(f.get_tensor, keys[0]) if keys else None
        for i, key in enumerate(keys):
            tensor = pending.result()
            pending = reader.submit(f.get_tensor, keys[i + 1]) if i + 1 < len(keys) else None
            yield key, tensor
