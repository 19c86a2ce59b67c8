"""Greedy generation at batch 1 with a static KV cache, each decode step optionally one CUDA graph.

What a serving engine does for one sequence, shared by ``quantune generate`` and the benchmarks:

1. prefill: the prompt runs once through the model and fills a transformers ``StaticCache``
   (fixed shapes, so that a decode step can be captured);
2. decode: one token a step, ``model(input_ids=tok, cache=cache, position_ids=pos)`` with ``tok``
   (1, 1) and ``pos`` (1, 1) updated in place (transformers before 5.2x name the cache
   ``past_key_values`` and also take ``cache_position``; both spellings are served). The step runs eagerly, or is captured
   once as a CUDA graph and replayed (no Python or launch overhead per token); ``compile`` also
   puts the decode step under :func:`quantune.compiler.compile_model` (the prompt runs uncompiled,
   so there is one compilation). Greedy: the next token is the argmax of the step's last logits.

The end-of-sequence token is looked for every ``check_every`` steps (one host synchronisation
each), so up to that many steps past it may run; the tokens after it are dropped.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict, dataclass

import torch

from quantune.config import QuantuneError

log = logging.getLogger(__name__)

MODES = ("auto", "eager", "graph", "compile")


@dataclass
class Generation:
    """New tokens (the first comes from the prompt's logits) and where the time went."""

    tokens: list[int]
    prompt_tokens: int
    mode: str
    device: str
    prefill_s: float  # the prompt's forward pass, up to the first new token (kernels' first-call compilation too)
    setup_s: float  # a warm-up step (kernels' compilation), graph capture, torch.compile's compilation
    decode_s: float  # the decode steps after the first new token
    stopped_at_eos: bool

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "new_tokens": len(self.tokens), "decode_tokens_per_s": self.decode_tokens_per_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_names(model) -> set[str]:
    """The keyword arguments the causal LM under ``model`` (compiled, or wrapped by peft) takes."""
    inner = getattr(model, "_orig_mod", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return set(inspect.signature(inner.forward).parameters)


def _rewind(cache, p: int) -> None:
    """Newer transformers count a static cache's written positions on the device: back to ``p``."""
    for layer in getattr(cache, "layers", []):
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.fill_(p)
        if isinstance(getattr(layer, "cumulative_length_int", None), int):  # sliding-window layers (5.2x)
            layer.cumulative_length_int = p


class StaticDecoder:
    """A prompt's static KV cache after the prefill, and the greedy decode steps that follow it.

    ``prompt``: (1, p) token ids on the model's device. ``prefill_model`` runs the prompt instead of
    ``model`` (a compiled ``model`` then only ever sees the decode step's shapes). After construction
    ``tok`` holds the prompt's greedy next token and ``prefill_s`` the prompt's time."""

    def __init__(self, model, prompt: torch.Tensor, max_new_tokens: int, prefill_model=None, spare: int = 4):
        from transformers import StaticCache

        if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
            raise QuantuneError(f"generation takes one non-empty prompt of shape (1, p), got {tuple(prompt.shape)}")
        if max_new_tokens < 1:
            raise QuantuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.p, self.device = model, prompt.shape[1], prompt.device
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and self.p + max_new_tokens > limit:
            raise QuantuneError(f"prompt of {self.p} tokens + {max_new_tokens} new tokens exceeds the model's "
                                f"{limit} positions")
        # ``spare``: the warm-up steps before a capture write one position past the prompt
        self.cache = StaticCache(config=model.config, max_cache_len=self.p + max_new_tokens + spare)
        # sliding-window layers decide on the host when their window is full and roll it (transformers 5.2x):
        # a CUDA graph would replay one decision, and a step taken back after the roll cannot be undone
        self.sliding = any(getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", []))
        names = _forward_names(prefill_model or model)
        self._cache_name = "cache" if "cache" in names else "past_key_values"
        self._cache_position = "cache_position" in names
        _sync(self.device)
        t0 = time.perf_counter()
        logits = self._forward(prefill_model or model, prompt, torch.arange(self.p, device=self.device)[None])
        self.tok = logits[:, -1:].argmax(-1)  # (1, 1), the decode step's input, updated in place
        _sync(self.device)
        self.prefill_s = time.perf_counter() - t0
        self.pos = torch.tensor([[self.p]], device=self.device)  # (1, 1), updated in place

    def _forward(self, model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {self._cache_name: self.cache, "position_ids": positions}
        if self._cache_position:
            kwargs["cache_position"] = positions[0]
        return model(input_ids=ids, **kwargs).logits

    def step(self, model=None) -> torch.Tensor:
        """One decode step's logits (1, 1, vocab) for the current token and position: the cache entry
        ``pos`` is written (newer transformers also advance the cache's own count: see :meth:`rewind`)."""
        return self._forward(model or self.model, self.tok, self.pos)

    def rewind(self) -> None:
        """Set the cache's own count of written positions back to ``pos`` (the prompt's length while
        no decode step has been kept)."""
        _rewind(self.cache, int(self.pos))

    def capture(self):
        """The decode step captured as a CUDA graph: ``(replay, logits)`` where ``replay()`` reruns it and
        ``logits`` is the tensor it writes. Warm-up (and compilation) on a side stream first."""
        if self.sliding:
            raise QuantuneError("this model has sliding-window attention layers, whose static cache a CUDA graph "
                                "cannot replay: generate with mode 'eager'")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # writes position p's cache entry, which the first replay rewrites
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.step()
        self.rewind()  # the warm-up steps advanced it
        return graph.replay, logits

    def run(self, steps: int, capture: bool, eos_token_id: int | list[int] | None = None,
            check_every: int = 16) -> tuple[list[int], float, float, bool]:
        """``steps`` greedy decode steps after the first token. Returns ``(tokens, setup_s, decode_s,
        stopped_at_eos)``; ``tokens`` starts with the prompt's own next token."""
        t0 = time.perf_counter()
        replay, out = self.capture() if capture else (None, None)
        if not capture and steps > 0 and not self.sliding:  # kernels compile on their first call, not in a timed step
            self.step()
            self.rewind()
        _sync(self.device)
        setup_s = time.perf_counter() - t0
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           device=self.device, dtype=torch.long)
        tokens, pending = [self.tok.clone()], []
        stopped = bool(eos.numel()) and bool(torch.isin(self.tok, eos).any())
        t0 = time.perf_counter()
        for i in range(0 if stopped else steps):
            if replay is not None:
                replay()
                logits = out
            else:
                logits = self.step()
            nxt = logits[:, -1:].argmax(-1)
            self.tok.copy_(nxt)
            self.pos += 1
            pending.append(nxt)
            if eos.numel() and check_every and ((i + 1) % check_every == 0 or i + 1 == steps):
                stopped = bool(torch.isin(torch.cat(pending), eos).any())
                tokens += pending
                pending = []
                if stopped:
                    break
        tokens += pending
        _sync(self.device)
        decode_s = time.perf_counter() - t0
        ids = torch.cat(tokens).flatten().tolist()
        ends = set(eos.tolist())
        first_end = next((i for i, t in enumerate(ids) if t in ends), None)
        if first_end is not None:
            ids, stopped = ids[:first_end + 1], True
        return ids, setup_s, decode_s, stopped


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto``: a CUDA graph on a GPU, eager steps on the CPU (and for models with sliding-window
    layers, see :class:`StaticDecoder`). ``graph`` and ``compile`` capture a CUDA graph, so they need a
    CUDA device."""
    if mode not in MODES:
        raise QuantuneError(f"unknown generation mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode in ("graph", "compile") and device.type != "cuda":
        raise QuantuneError(f"generation mode {mode!r} captures a CUDA graph: it needs the model on a CUDA device, "
                            f"not {device.type}")
    return mode


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, mode: str = "auto",
                    eos_token_id: int | list[int] | None = None, check_every: int = 16) -> Generation:
    """Greedy continuation of ``input_ids`` (1, p) by ``model`` (a transformers causal LM, quantized or
    not, on the device of ``input_ids``): up to ``max_new_tokens`` new tokens, fewer when
    ``eos_token_id`` comes (it is kept as the last token). See the module docstring for the modes."""
    device = input_ids.device
    requested, mode = mode, resolve_mode(mode, device)
    step_model = model
    if mode == "compile":
        from quantune.compiler import compile_model

        step_model = compile_model(model, dynamic=False)
    decoder = StaticDecoder(step_model, input_ids, max_new_tokens, prefill_model=model)
    if requested == "auto" and decoder.sliding:
        log.info("sliding-window attention layers: decoding eagerly (a CUDA graph cannot replay their cache)")
        mode = "eager"
    tokens, setup_s, decode_s, stopped = decoder.run(max_new_tokens - 1, capture=mode != "eager",
                                                     eos_token_id=eos_token_id, check_every=check_every)
    return Generation(tokens=tokens, prompt_tokens=decoder.p, mode=mode, device=str(device),
                      prefill_s=decoder.prefill_s, setup_s=setup_s, decode_s=decode_s, stopped_at_eos=stopped)
