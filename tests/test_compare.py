"""The comparison harness: method names, peer codecs through their real packages, plots."""

import pytest
import torch

from eval.compare import family, plot, quantize_variant, quantune_config
from eval.peers import peer_codec
from tests.conftest import tiny_model

pytest.importorskip("bitsandbytes")
pytest.importorskip("hqq")


def test_method_names_parse():
    cfg = quantune_config("kashin-3-g128-u2-had")
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.ku, cfg.transform) == ("kashin", 3, 128, 2, "hadamard")
    cfg = quantune_config("rtn-4-asym-g64")
    assert (cfg.method, cfg.bits, cfg.symmetric, cfg.group_size) == ("rtn", 4, False, 64)
    assert quantune_config("rtn-2-sym").group_size is None
    cfg = quantune_config("kashin-3.5-g256-rel")
    assert (cfg.bits, cfg.target_bits, cfg.group_size) == (3, 3.5, 256)
    assert quantune_config("kashin-4").target_bits is None
    assert quantune_config("bnb-nf4-dq") is None
    assert family("bnb-nf4") == "bnb" and family("kashin-4") == "quantune kashin"
    with pytest.raises(ValueError, match="unknown peer"):
        peer_codec("gptq-4")


@pytest.mark.parametrize("name,bpw,max_err", [
    ("bnb-nf4", 4.5, 0.11), ("bnb-nf4-dq", 4.127, 0.11), ("bnb-fp4-dq", 4.127, 0.14),
    ("hqq-4-g128", 4.25, 0.11), ("hqq-3-g64", 3.5, 0.21), ("hqq-2-g64", 2.5, 0.5),
])
def test_peer_codecs_count_bits_and_reconstruct(name, bpw, max_err):
    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(0))
    w_hat, bits = peer_codec(name)(w)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    assert bits / w.numel() == pytest.approx(bpw, abs=2e-3)
    assert 0 < float((w_hat - w).norm() / w.norm()) < max_err


@pytest.mark.parametrize("name", ["kashin-4", "kashin-2.5-rel", "rtn-3-asym-g32", "bnb-nf4-dq", "hqq-4-g32"])
def test_variants_quantize_every_block_linear_and_leave_the_original(name):
    model = tiny_model("llama")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    qmodel, bpw, seconds = quantize_variant(model, name)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    ids = torch.randint(3, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = qmodel(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert bpw > 2 and seconds >= 0


def test_plot_writes_a_png(tmp_path):
    rows = [{"method": "kashin-4", "family": "quantune kashin", "bpw": 4.09, "ppl": 44.0},
            {"method": "bnb-nf4-dq", "family": "bnb", "bpw": 4.13, "ppl": 37.5}]
    plot(rows, 29.9, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
