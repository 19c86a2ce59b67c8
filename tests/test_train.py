"""The training objective's fast paths (chunked loss, compiled layers, cached weights) against the plain ones."""
import copy

import pytest
import torch

import quantune.train as train_mod
from quantune.config import QuantConfig
from quantune.lora import attach_lora, make_lora_config
from quantune.qlinear import cached_weights
from quantune.quantize import quantize_model
from quantune.train import CausalLMLoss, TrainConfig, compile_layers, compute_loss, lm_parts, train
from tests.conftest import FAMILIES, tiny_model

CPU = torch.device("cpu")


def _peft(family="llama", seed=0):
    torch.manual_seed(seed)
    model = tiny_model(family)
    original = copy.deepcopy(model)
    quantize_model(model, QuantConfig(bits=2), progress=False)
    torch.manual_seed(seed)
    pm = attach_lora(model, make_lora_config(r=4, alpha=8))
    for name, p in pm.named_parameters():  # non-zero B, so the adapters take part in the gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return pm, original.eval()


def _batch(vocab=320, n=3, seq=20, seed=0):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(pm, batch, cfg, teacher, chunked):
    pm.zero_grad(set_to_none=True)
    loss, logs = CausalLMLoss(pm, cfg, teacher, chunked=chunked)(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    return loss.detach(), logs, grads


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "opt"])
@pytest.mark.parametrize("objective", ["ce", "kd"])
def test_chunked_loss_matches_the_full_logits(family, objective, monkeypatch):
    monkeypatch.setattr(train_mod, "LOSS_CHUNK_ELEMENTS", 320 * 7)  # many blocks, the last one short
    pm, teacher = _peft(family)
    assert lm_parts(pm) is not None
    cfg = TrainConfig(objective=objective, kd_alpha=0.7, kd_temperature=2.0, precision="fp32")
    batch = _batch()
    full, full_logs, full_grads = _loss_and_grads(pm, batch, cfg, teacher, chunked=False)
    chunk, chunk_logs, chunk_grads = _loss_and_grads(pm, batch, cfg, teacher, chunked=True)
    torch.testing.assert_close(chunk, full, rtol=1e-5, atol=1e-6)
    assert set(chunk_logs) == set(full_logs) == ({"ce"} if objective == "ce" else {"ce", "kd"})
    for name in full_grads:
        torch.testing.assert_close(chunk_grads[name], full_grads[name], rtol=1e-4, atol=1e-7)
    # and the plain loss is what compute_loss computes
    torch.testing.assert_close(compute_loss(pm, batch, cfg, teacher)[0].detach(), full)


def test_models_with_a_logit_transform_keep_the_full_logits():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=96, final_logit_softcapping=30.0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert lm_parts(model) is None
    loss_model = CausalLMLoss(model, TrainConfig(precision="fp32"))
    torch.testing.assert_close(loss_model(_batch())[0], compute_loss(model, _batch(), TrainConfig())[0])


def test_cached_weights_give_the_same_loss_and_gradients():
    pm, _ = _peft()
    cfg = TrainConfig(precision="fp32")
    batch = _batch()
    plain, _, plain_grads = _loss_and_grads(pm, batch, cfg, None, chunked=True)
    with cached_weights(pm, torch.float32):
        cached, _, cached_grads = _loss_and_grads(pm, batch, cfg, None, chunked=True)
    torch.testing.assert_close(cached, plain)
    for name in plain_grads:
        torch.testing.assert_close(cached_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)


def test_compiled_layers_train_like_eager(tmp_path):
    """Graph capture of peft's LoRA layers around QuantLinear (the aot_eager backend: the same
    dynamo and autograd tracing as inductor, without generating code)."""
    data = _batch(n=4, seq=16).repeat(4, 1)  # memorisable: the loss must fall
    runs = []
    for compiled in (False, True):
        pm, _ = _peft()
        if compiled:
            assert compile_layers(pm, backend="aot_eager") == 2
        cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=2e-2, schedule="constant", precision="fp32",
                          log_every=0, cache_weights=True, grad_checkpointing=compiled)
        runs.append(train(pm, data, cfg, out_dir=tmp_path / str(compiled), device=CPU, log=lambda *_: None))
    eager, compiled = ([s["loss"] for s in r["steps"]] for r in runs)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] < eager[0]
