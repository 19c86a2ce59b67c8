"""Tiny models and tokenizers built from configs: no downloads, fixed seeds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
