"""Greedy generation with a static cache (quantune.generate): the same tokens as transformers'
own greedy generate, for float and quantized tiny models; the end-of-sequence stop; bad inputs.
The CUDA-graph and compiled modes are checked against the eager steps on a GPU (-m gpu)."""
import pytest
import torch

from quantune.config import QuantConfig, QuantuneError
from quantune import generate
from quantune.generate import StaticDecoder, greedy_generate, resolve_mode
from quantune.quantize import quantize_model
from tests.conftest import FAMILIES, tiny_model

PROMPT = torch.tensor([[0, 5, 17, 99, 3, 44]])


def reference_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_steps_give_transformers_greedy_tokens(family):
    """40 new tokens: past the tiny Gemma's 32-token sliding window."""
    model = tiny_model(family)
    got = greedy_generate(model, PROMPT, 40)
    assert got.tokens == reference_tokens(model, PROMPT, 40)
    assert got.mode == "eager" and got.prompt_tokens == 6 and not got.stopped_at_eos
    assert got.decode_tokens_per_s > 0 and got.prefill_s > 0


@pytest.mark.parametrize("cfg", [QuantConfig(method="rtn", bits=4, group_size=32), QuantConfig(method="kashin", bits=3)],
                         ids=["rtn4", "kashin3"])
def test_quantized_model_generates_transformers_greedy_tokens(cfg):
    model = tiny_model("llama", seed=1)
    quantize_model(model, cfg, progress=False)
    assert greedy_generate(model, PROMPT, 24).tokens == reference_tokens(model, PROMPT, 24)


@pytest.mark.parametrize("check_every", [1, 5, 16])
def test_generation_stops_at_the_first_end_of_sequence_token(check_every):
    model = tiny_model("qwen2")
    free = greedy_generate(model, PROMPT, 30).tokens
    stop_at = next(i for i in range(3, 30) if free[i] not in free[:i])  # a token's first appearance
    got = greedy_generate(model, PROMPT, 30, eos_token_id=[free[stop_at], 9999], check_every=check_every)
    assert got.tokens == free[:stop_at + 1] and got.stopped_at_eos
    first = greedy_generate(model, PROMPT, 30, eos_token_id=free[0])  # the prompt's own next token ends it
    assert first.tokens == free[:1] and first.stopped_at_eos and first.decode_tokens_per_s is None


def test_sliding_window_models_are_decoded_eagerly(monkeypatch):
    """Their static cache rolls on a decision taken on the host, which a CUDA graph cannot replay:
    capture is refused, and mode auto decodes eagerly where it would have captured."""
    model = tiny_model("gemma3")
    assert StaticDecoder(model, PROMPT, 8).sliding and not StaticDecoder(tiny_model("llama"), PROMPT, 8).sliding
    with pytest.raises(QuantuneError, match="sliding-window attention layers"):
        StaticDecoder(model, PROMPT, 8).capture()
    monkeypatch.setattr(generate, "resolve_mode", lambda mode, device: "graph")  # as on a GPU
    got = generate.greedy_generate(model, PROMPT, 40)
    assert got.mode == "eager" and got.tokens == reference_tokens(model, PROMPT, 40)


def test_bad_generation_requests_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(QuantuneError, match="at least 1"):
        greedy_generate(model, PROMPT, 0)
    with pytest.raises(QuantuneError, match="one non-empty prompt"):
        greedy_generate(model, PROMPT.repeat(2, 1), 4)
    with pytest.raises(QuantuneError, match="exceeds the model's 256 positions"):
        greedy_generate(model, PROMPT, 251)
    with pytest.raises(QuantuneError, match="needs the model on a CUDA device"):
        greedy_generate(model, PROMPT, 4, mode="graph")
    with pytest.raises(QuantuneError, match="unknown generation mode"):
        resolve_mode("fast", torch.device("cpu"))
    assert resolve_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_mode("auto", torch.device("cuda")) == "graph"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", [None, QuantConfig(method="rtn", bits=4), QuantConfig(method="kashin", bits=4),
                                 QuantConfig(method="kashin", bits=4, transform="hadamard")],
                         ids=["bf16", "rtn4", "kashin4", "kashin4-hadamard"])
def test_graph_and_compiled_steps_give_the_eager_tokens_on_the_gpu(cfg):
    """A larger tiny Llama (the fused kernels' shapes) in bf16 on the GPU: the CUDA-graph replay and the
    compiled graph give the eager static-cache tokens and transformers' own greedy tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if cfg is not None:
        quantize_model(model, cfg, progress=False)
    prompt = PROMPT.cuda()
    eager = greedy_generate(model, prompt, 32, mode="eager")
    assert eager.tokens == reference_tokens(model, prompt, 32)
    assert greedy_generate(model, prompt, 32, mode="graph").tokens == eager.tokens
    compiled = greedy_generate(model, prompt, 32, mode="compile")
    # inductor's bf16 arithmetic may part from eager's on near ties (notes: 4-6% logits differences on random
    # models): the first tokens must agree
    assert compiled.tokens[:4] == eager.tokens[:4] and len(compiled.tokens) == 32
