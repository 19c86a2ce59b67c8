"""Random-weight Llama models of a real model's shape, float or quantized in place, for the host-time and
generation benchmarks (eval.profile_generate_host, eval.profile_launch, eval.bench_hf_generate)."""
from __future__ import annotations

import torch

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)


def random_llama(fmt: str, shape: dict = SMOLLM2, device: str = "cpu", seed: int = 0):
    """``(model, result)``: a bf16 Llama of ``shape`` with seeded random weights on ``device``, quantized in
    place for ``fmt`` ``METHOD-BITS`` (``result``: quantize_model's, its config already in
    ``model.config.quantization_config``), or left float for ``"float"`` (``result`` None)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quantune.config import QuantConfig
    from quantune.quantize import quantize_model

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16).eval()
    if fmt == "float":
        return model, None
    method, bits = fmt.split("-")
    result = quantize_model(model, QuantConfig(method=method, bits=int(bits)), progress=False)
    model.config.quantization_config = result.config.to_dict()
    return model, result
