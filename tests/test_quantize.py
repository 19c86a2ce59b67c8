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


def test_allocate_bits_takes_the_largest_gain_per_added_bit_within_the_budget():
    from quantune.quantize import allocate_bits

    sizes = {"a": 100, "b": 100, "c": 200, "d": 50}
    gains = {"a": 1.0, "b": 5.0, "c": 4.0, "d": 2.0}  # per weight: a .01, b .05, c .02, d .04
    assert allocate_bits(gains, sizes, 3, 3.0) == set()
    assert allocate_bits(gains, sizes, 3, 4.0) == set(sizes)
    # budget 0.5 * 450 = 225 weights: b (100) and d (50) fit, c (200) no longer does, a (100) does not
    assert allocate_bits(gains, sizes, 3, 3.5) == {"b", "d"}
    # a budget that skips a big layer still fills with smaller ones
    assert allocate_bits(gains, sizes, 3, 3.0 + 160 / 450) == {"b", "d"}


@pytest.mark.parametrize("sensitivity", ["abs", "rel"])
def test_fractional_bits_mix_two_widths_up_to_the_target(sensitivity):
    model = tiny_model("llama")
    result = quantize_model(model, QuantConfig(bits=3, target_bits=3.5), progress=False, sensitivity=sensitivity)
    cfg = result.config
    assert cfg.bits == 3 and cfg.target_bits == 3.5 and cfg.module_bits
    assert set(cfg.module_bits.values()) == {4}
    sizes = {n: s["shape"][0] * s["shape"][1] for n, s in result.layers.items()}
    mean_bits = sum(cfg.module_bits.get(n, 3) * k for n, k in sizes.items()) / sum(sizes.values())
    assert 3.0 < mean_bits <= 3.5
    for name, stats in result.layers.items():
        module = model.get_submodule(name)
        assert module.qconfig.bits == stats["bits"] == cfg.module_bits.get(name, 3)
        assert module.qconfig.module_bits == {}


def test_mixed_widths_beat_the_lower_width_and_trail_the_higher():
    errors = {}
    for cfg in (QuantConfig(bits=2), QuantConfig(bits=2, target_bits=2.5), QuantConfig(bits=3)):
        result = quantize_model(tiny_model("llama"), cfg, progress=False)
        errors[cfg.target_bits or cfg.bits] = sum(s["rel_error"] ** 2 for s in result.layers.values())
    assert errors[3] < errors[2.5] < errors[2]


@pytest.mark.parametrize("changes,match", [
    (dict(target_bits=8.5), "target bits"), (dict(target_bits=1.5), "target bits"),
    (dict(module_bits={"x": 9}), "bits of x"), (dict(module_bits={"x": 2.5}), "bits of x"),
    (dict(u_steps=3, module_bits={"x": 2}), "exceeds the 2 bits of x"),
])
def test_mixed_width_settings_are_validated(changes, match):
    with pytest.raises(QuantuneError, match=match):
        QuantConfig(bits=3, **changes)
