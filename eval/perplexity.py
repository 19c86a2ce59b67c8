"""Perplexity and KL divergence over non-overlapping windows.

Protocol (stated in every report): tokenize the whole text once without special tokens,
cut it into the first ``max_windows`` non-overlapping windows of ``seq_len`` tokens, and
score every next token inside each window. Where the tokenizer adds a BOS token by itself
(Gemma, Llama-2, ...), each window starts with BOS followed by ``seq_len - 1`` text tokens,
so that every text token is scored in a context the model was trained on.

    ppl = exp(mean NLL over scored tokens)
    KL  = mean over scored positions of KL(p_reference || p_model), in nats
    top1 = fraction of scored positions where both models' argmax agree
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantune.config import QuantuneError


@dataclass
class Protocol:
    text: str
    seq_len: int
    windows: int
    bos: bool
    scored_tokens: int

    def describe(self) -> str:
        bos = f"BOS + {self.seq_len - 1} text tokens" if self.bos else "no BOS added"
        return (f"{self.windows} non-overlapping windows of {self.seq_len} tokens ({bos}) from the start of "
                f"{self.text}, {self.scored_tokens} scored next-token predictions")


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts BOS in front of text by itself (the model expects it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x").input_ids
    return bool(ids) and ids[0] == bos


def needs_bos(model, tokenizer) -> bool:
    """Gemma models are trained with BOS at the start of every sequence; others when their tokenizer adds it."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("gemma") or tokenizer_adds_bos(tokenizer)


def make_windows(tokenizer, text: str, seq_len: int, max_windows: int | None,
                 bos: bool | None = None, text_name: str = "text") -> tuple[torch.Tensor, Protocol]:
    """Token windows ``(W, seq_len)`` and the protocol that describes them."""
    if seq_len < 2:
        raise QuantuneError(f"sequence length must be >= 2, got {seq_len}")
    add_bos = tokenizer_adds_bos(tokenizer) if bos is None else bos
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    body = seq_len - 1 if add_bos else seq_len
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise QuantuneError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * body].reshape(n, body)
    if add_bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
    return windows, Protocol(text_name, seq_len, n, add_bos, n * (seq_len - 1))


@dataclass
class Metrics:
    ppl: float
    nll: float
    tokens: int
    kl: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model, window: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=window[None].to(device), use_cache=False)
    return out.logits[0, :-1].float()


@torch.no_grad()
def evaluate_models(models: dict, windows: torch.Tensor, reference=None, progress: bool = True) -> dict:
    """Metrics for each of ``models`` (name -> model) on the same windows, in one pass.

    With a ``reference`` model, its logits are computed once per window and KL / top-1
    agreement of every model are measured against them.
    """
    sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0} for name in models}
    count = 0
    for window in tqdm(windows, desc="evaluating", unit="window", disable=not progress):
        targets = window[1:]
        ref_logp = ref_top = None
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, window), -1)
            ref_top = ref_logp.argmax(-1)
        for name, model in models.items():
            logp = ref_logp if model is reference else F.log_softmax(_logits(model, window), -1)
            sums[name]["nll"] += float(-logp.gather(-1, targets[:, None].to(logp.device)).sum())
            if ref_logp is not None:
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                sums[name]["kl"] += float(kl.sum())
                sums[name]["top1"] += int((logp.argmax(-1) == ref_top).sum())
        count += targets.numel()
    results = {}
    for name, s in sums.items():
        nll = s["nll"] / count
        results[name] = Metrics(
            ppl=math.exp(nll), nll=nll, tokens=count,
            kl=s["kl"] / count if reference is not None else None,
            top1=s["top1"] / count if reference is not None else None,
        )
    return results


def add_protocol_args(parser, windows: int = 16) -> None:
    """The evaluation options every eval/ script shares."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/austen/persuasion.txt")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=windows)
    parser.add_argument("--device", default="cpu", help="where to quantize and evaluate (e.g. cuda)")


def load_protocol(args):
    """``(model, tokenizer, windows, protocol)`` for options from :func:`add_protocol_args`."""
    from quantune.data import load_text
    from quantune.models import load_model

    model, tokenizer, _ = load_model(args.model)
    model.to(args.device)
    text, text_name = load_text(args.data)
    windows, protocol = make_windows(tokenizer, text, args.seq_len, args.windows, bos=needs_bos(model, tokenizer),
                                     text_name=text_name)
    return model, tokenizer, windows, protocol
