"""Training state for ``--resume``: optimizer, scheduler, GradScaler and RNG in one safetensors file.

Format (``format_version`` "1"): a single ``.safetensors`` file, no pickle anywhere.

* tensors: every tensor of the nested states (contiguous, on CPU), keyed by its dotted path,
  e.g. ``optimizer.state.0.exp_avg``, ``rng.torch``, ``rng.cuda.0``;
* metadata ``"format_version": "1"`` and ``"quantune_training_state"``: one JSON string
  ``{"step": int, "extra": {...}, "state": skeleton}``. The skeleton mirrors the nested state:
  JSON scalars (int, float, bool, None, str) stand for themselves and every JSON object is a tag,
  ``{"tensor": key}``, ``{"list": [...]}``, ``{"tuple": [...]}`` or ``{"dict": [[key, value], ...]}``
  (keys encoded like values), so ints stay ints, tuples stay tuples and int dict keys (optimizer
  param ids) come back as ints.

The file is written to a temporary file in the same folder and moved into place with
``os.replace``, so ``path`` holds either the old state or the complete new one.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from quantune.config import QuantuneError

FORMAT_VERSION = "1"
METADATA_KEY = "quantune_training_state"


def flatten_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state into ``({dotted path: CPU contiguous tensor}, JSON skeleton)``."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    join = lambda path, k: f"{path}.{k}" if path else str(k)  # noqa: E731

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen_storage:  # safetensors refuses tensors sharing memory
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
            key, n = path, 0
            while key in tensors:  # e.g. keys 0 and "0", or "a.b" next to a -> b
                n += 1
                key = f"{path}#{n}"
            tensors[key] = t
            return {"tensor": key}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, dict):
            return {"dict": [[enc(k, join(path, "<key>")), enc(v, join(path, k))] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [enc(v, join(path, i)) for i, v in enumerate(obj)]
            return {"tuple" if isinstance(obj, tuple) else "list": items}
        raise TypeError(f"cannot store a {type(obj).__name__} (at {path or 'top level'}) in a training state")

    return tensors, enc(state, "")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if not isinstance(skeleton, dict):
        return skeleton
    (tag, body), = skeleton.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {unflatten_state(tensors, k): unflatten_state(tensors, v) for k, v in body}
    if tag in ("list", "tuple"):
        items = [unflatten_state(tensors, v) for v in body]
        return tuple(items) if tag == "tuple" else items
    raise ValueError(f"unknown skeleton tag {tag!r}")


def save_training_state(path: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                        scaler: Any = None, step: int, extra: dict | None = None) -> None:
    """Write optimizer/scheduler/scaler state, RNG states, ``step`` and ``extra`` atomically to ``path``."""
    path = Path(path)
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"optimizer": optimizer.state_dict(), "rng": rng,
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "scaler": None if scaler is None else scaler.state_dict()}
    tensors, skeleton = flatten_state(state)
    header = json.dumps({"step": int(step), "extra": extra or {}, "state": skeleton})
    metadata = {"format_version": FORMAT_VERSION, METADATA_KEY: header}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_training_state(path: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                        scaler: Any = None, map_location: str | torch.device | None = None) -> dict:
    """Restore the states saved by :func:`save_training_state` in place; return ``{"step", "extra"}``.

    ``map_location`` moves the saved optimizer/scheduler/scaler tensors there first; leave it None
    for torch optimizers, whose ``load_state_dict`` casts state to each param's device (and keeps a
    non-capturable AdamW ``step`` on the CPU, where it must stay).
    """
    path = Path(path)
    if not path.is_file():
        raise QuantuneError(f"training state {path} not found")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if METADATA_KEY not in metadata:
                raise QuantuneError(f"{path} is not a quantune training state (no {METADATA_KEY!r} metadata)")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise QuantuneError(f"{path} has training-state format version "
                                    f"{metadata.get('format_version')!r}; this quantune reads {FORMAT_VERSION!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as exc:
        raise QuantuneError(f"{path} is not a readable safetensors file: {exc}") from exc
    header = json.loads(metadata[METADATA_KEY])
    if map_location is not None:
        tensors = {k: v if k.startswith("rng.") else v.to(map_location) for k, v in tensors.items()}
    state = unflatten_state(tensors, header["state"])

    saved_groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        now = [len(g["params"]) for g in optimizer.param_groups]
        raise QuantuneError(f"checkpoint was made for a different set of trainable parameters (params per group: "
                            f"saved {saved_groups}, now {now}): {exc}") from exc
    if scheduler is not None:
        if state["scheduler"] is None:
            raise QuantuneError(f"{path} holds no lr scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and (state["scaler"] or scaler.is_enabled()):
        if not state["scaler"]:
            raise QuantuneError(f"{path} holds no GradScaler state (saved without one or with a disabled one)")
        scaler.load_state_dict(state["scaler"])

    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        for i, s in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    return {"step": header["step"], "extra": header["extra"]}
