"""Module swap on tiny models of every supported family."""
import pytest
import torch
from torch import nn

from quantune.config import QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import plan_modules, quantize_model
from tests.conftest import FAMILIES, tiny_model


def _snr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_but_the_head_is_quantized(family):
    model = tiny_model(family)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    result = quantize_model(model, QuantConfig(bits=4), progress=False)
    head = "lm_head"
    assert set(result.layers) == set(linears) - {head}
    assert head in result.full_precision and "output head" in result.full_precision[head]
    assert any("embedding" in reason for reason in result.full_precision.values())
    for name in result.layers:
        assert isinstance(model.get_submodule(name), QuantLinear)
    assert isinstance(model.get_submodule(head), nn.Linear)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,bits,floor_db", [("kashin", 8, 25.0), ("rtn", 8, 25.0), ("kashin", 4, 8.0)])
def test_quantized_logits_track_the_original(family, method, bits, floor_db):
    model = tiny_model(family)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        quantize_model(model, QuantConfig(method=method, bits=bits, group_size=32), progress=False)
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    assert _snr_db(ref, out) > floor_db


def test_skip_keeps_named_modules_and_rejects_unknown_names():
    model = tiny_model("llama")
    result = quantize_model(model, QuantConfig(skip_modules=("down_proj",)), progress=False)
    kept = [n for n in result.full_precision if n.endswith("down_proj")]
    assert len(kept) == 2 and all("--skip" in result.full_precision[n] for n in kept)
    with pytest.raises(QuantuneError, match="no module"):
        plan_modules(tiny_model("llama"), QuantConfig(skip_modules=("nonexistent_proj",)))


def test_unsupported_layer_type_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(QuantuneError, match="unsupported layer .*Conv1D"):
        quantize_model(model, QuantConfig(), progress=False)


def test_per_layer_stats_are_recorded():
    model = tiny_model("qwen2")
    result = quantize_model(model, QuantConfig(bits=3), progress=False)
    for stats in result.layers.values():
        assert 0 < stats["rel_error"] < 1
        assert stats["bits_per_weight"] > 3
        assert len(stats["history"]) == 1 + 6 + 1  # greedy init, 6 sweeps, float16 coefficients
        assert stats["history"][-1] == pytest.approx(stats["rel_error"], rel=1e-3)
