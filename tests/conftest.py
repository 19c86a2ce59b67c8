"""Tiny models and tokenizers built from configs: no downloads, fixed seeds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under its CPU interpreter here (correctness only); the flag must be set
    # before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

FAMILIES = ("llama", "qwen2", "gemma3", "opt")


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in well under a second on Python's bundled docs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantune.data import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([builtin_text()[:60_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str, vocab_size: int = 320):
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "llama":
        return LlamaConfig(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "gemma3":
        return Gemma3TextConfig(intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=32,
                                **common)
    if family == "opt":
        return OPTConfig(ffn_dim=96, word_embed_proj_dim=64, enable_bias=True, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, tokenizer):
    """``{family: folder}`` of tiny float models saved the transformers way (config, weights, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-models")
    folders = {}
    for family in FAMILIES:
        folder = root / family
        tiny_model(family).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from quantune.data import builtin_text

    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(builtin_text()[:20_000])
    return path


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    """Write a tiny Llama and its BPE tokenizer as a float32 GGUF file (llama.cpp layout)."""
    import json

    import gguf
    import numpy as np

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)

    def unpermute(x, n):  # llama.cpp stores q/k rows interleaved per rotary pair
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in parts:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf].float()
        if gg.endswith("attn_q.weight"):
            t = unpermute(t, heads)
        if gg.endswith("attn_k.weight"):
            t = unpermute(t, kv_heads)
        w.add_tensor(gg, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, tiny_model("llama"), tokenizer)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
