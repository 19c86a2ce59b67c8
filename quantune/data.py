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
