"""Perplexity windows and metrics against a direct computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from eval.perplexity import evaluate_models, make_windows, needs_bos
from quantune.config import QuantuneError
from quantune.data import builtin_text, load_text
from tests.conftest import tiny_model

TEXT = builtin_text()[:8000]


def test_windows_are_consecutive_text_without_bos(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    windows, protocol = make_windows(tokenizer, TEXT, 32, 5, bos=False)
    assert windows.shape == (5, 32)
    assert windows.flatten().tolist() == ids[:160]
    assert protocol.scored_tokens == 5 * 31 and not protocol.bos
    assert "5 non-overlapping windows of 32 tokens (no BOS added)" in protocol.describe()


def test_windows_with_bos(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    windows, protocol = make_windows(tokenizer, TEXT, 32, 4, bos=True)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert windows[:, 1:].flatten().tolist() == ids[: 4 * 31]
    assert protocol.bos and "(BOS + 31 text tokens)" in protocol.describe()


def test_gemma_gets_bos_and_llama_follows_its_tokenizer(tokenizer):
    assert needs_bos(tiny_model("gemma3"), tokenizer)
    assert not needs_bos(tiny_model("llama"), tokenizer)


def test_too_short_text_is_an_error(tokenizer):
    with pytest.raises(QuantuneError, match="fewer than one window"):
        make_windows(tokenizer, "tiny", 64, None)


def test_metrics_match_direct_computation(tokenizer):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows, _ = make_windows(tokenizer, TEXT, 32, 3, bos=False)
    result = evaluate_models({"a": model, "b": other}, windows, reference=model, progress=False)
    with torch.no_grad():
        logits_a = model(input_ids=windows).logits[:, :-1]
        logits_b = other(input_ids=windows).logits[:, :-1]
    targets = windows[:, 1:]
    nll = F.cross_entropy(logits_a.reshape(-1, logits_a.shape[-1]), targets.reshape(-1))
    assert result["a"].ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result["a"].kl == 0 and result["a"].top1 == 1
    kl = F.kl_div(F.log_softmax(logits_b, -1), F.log_softmax(logits_a, -1), log_target=True, reduction="none").sum(-1)
    assert result["b"].kl == pytest.approx(float(kl.mean()), rel=1e-4)
    agree = (logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean()
    assert result["b"].top1 == pytest.approx(float(agree))
    assert result["a"].tokens == 3 * 31


def test_text_sources(tmp_path):
    assert len(load_text("builtin")[0]) > 400_000
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert load_text(str(f)) == ("hello", str(f))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(QuantuneError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(QuantuneError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
