"""Text sources: Python's bundled documentation, plain .txt files, and WikiText-2."""
from __future__ import annotations

from pathlib import Path

from quantune.config import QuantuneError

BUILTIN = "builtin"
WIKITEXT2 = "wikitext2"


def builtin_text() -> str:
    """Python's bundled pydoc topics (about 465 KB of English), present on every install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def wikitext2_text(split: str = "test") -> str:
    try:
        import datasets
    except ImportError as exc:
        raise QuantuneError("--data wikitext2 needs the 'datasets' package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as exc:  # network, hub or cache failure: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantuneError(f"could not load wikitext2 (no network or hub access?): {first}") from exc
    return "\n\n".join(ds["text"])


def load_text(spec: str) -> tuple[str, str]:
    """``(text, description)`` for ``builtin``, ``wikitext2`` or a path to a text file."""
    if spec == BUILTIN:
        return builtin_text(), "builtin (Python pydoc_data.topics)"
    if spec == WIKITEXT2:
        return wikitext2_text(), "wikitext2 (wikitext-2-raw-v1, test split)"
    path = Path(spec)
    if not path.is_file():
        raise QuantuneError(f"data file not found: {spec} (use a .txt path, 'builtin' or 'wikitext2')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantuneError(f"data file is not UTF-8 text: {spec}") from exc
    if not text.strip():
        raise QuantuneError(f"data file is empty: {spec}")
    return text, str(path)


def load_training_texts(specs, text_field: str = "text") -> tuple[list[str], str]:
    """Documents for fine-tuning from ``builtin``, ``.txt`` files or ``.jsonl`` files (one JSON
    object per line, text under ``text_field``). Returns ``(documents, description)``."""
    import json

    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise QuantuneError("no training data given (--data FILE, repeatable; or builtin)")
    docs, names = [], []
    for spec in specs:
        if spec.endswith(".jsonl"):
            path = Path(spec)
            if not path.is_file():
                raise QuantuneError(f"data file not found: {spec}")
            found = 0
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise QuantuneError(f"{spec} line {i} is not JSON: {exc.msg}") from exc
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise QuantuneError(f"{spec} line {i} has no string field {text_field!r}")
                if text.strip():
                    docs.append(text)
                    found += 1
            if not found:
                raise QuantuneError(f"data file has no text: {spec}")
            names.append(path.name)
        else:
            text, name = load_text(spec)
            docs.append(text)
            names.append(Path(name).name if spec != BUILTIN else "builtin")
    return docs, " + ".join(names)


def pack_documents(tokenizer, documents: list[str], seq_len: int, bos: bool = False):
    """Token ids of all documents, EOS-separated, packed into ``(N, seq_len)`` sequences
    (every sequence full, the tail dropped). With ``bos`` each sequence starts with BOS."""
    import torch

    if seq_len < 2:
        raise QuantuneError(f"sequence length must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
    body = seq_len - 1 if bos else seq_len
    n = len(ids) // body
    if n == 0:
        raise QuantuneError(f"training data has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    data = torch.tensor(ids[: n * body], dtype=torch.long).reshape(n, body)
    if bos:
        data = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), data], 1)
    return data


class BatchOrder:
    """Deterministic, resumable order of training sequences.

    Epoch ``e`` visits the sequences in ``randperm(N, seed + e)``; the sample for optimizer
    step ``s``, micro-batch ``m``, process ``rank`` of ``world`` follows from those numbers
    alone, so a resumed run sees exactly the data the uninterrupted run would have seen, and
    the ranks of a data-parallel run split each global batch between them.
    """

    def __init__(self, num_sequences: int, batch_size: int, grad_accum: int, seed: int, world: int = 1,
                 rank: int = 0):
        self.n, self.batch, self.accum, self.seed, self.world, self.rank = (
            num_sequences, batch_size, grad_accum, seed, world, rank)
        self._perms: dict[int, "torch.Tensor"] = {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        per_step = self.batch * self.accum * self.world
        first = step * per_step + (micro * self.world + self.rank) * self.batch
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(first, first + self.batch)]

    def epoch_of(self, step: int) -> float:
        return step * self.batch * self.accum * self.world / self.n
