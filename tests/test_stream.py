"""Streaming quantization from safetensors shards equals the in-memory path."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantune.config import QuantConfig, QuantuneError
from quantune.quantize import quantize_model
from quantune.serialization import atomic_folder, load, save_model_files
from quantune.stream import checkpoint_shards, quantize_checkpoint
from tests.conftest import tiny_model


def _in_memory(folder, cfg, out, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    result = quantize_model(model, cfg, progress=False)
    with atomic_folder(out) as tmp:
        save_model_files(model, tokenizer, result.config, tmp)
    return result


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_streamed_folder_equals_the_in_memory_one(family, shard_size, tmp_path, tokenizer):
    src = tmp_path / "src"
    model = tiny_model(family)
    model.save_pretrained(src, max_shard_size=shard_size) if shard_size else model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert (len(checkpoint_shards(src)) > 1) == bool(shard_size)
    cfg = QuantConfig(bits=3, group_size=32)
    streamed = quantize_checkpoint(src, tmp_path / "streamed", cfg, progress=False)
    ref = _in_memory(src, cfg, tmp_path / "ref", tokenizer)
    assert list(streamed.layers) == list(ref.layers)
    assert all(streamed.layers[n]["rel_error"] == ref.layers[n]["rel_error"] for n in ref.layers)
    a, _ = load(tmp_path / "streamed")
    b, _ = load(tmp_path / "ref")
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    qc = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 3 and "lm_head" in qc["modules_in_full_precision"]
    assert (tmp_path / "streamed" / "tokenizer.json").is_file()


def test_overlapped_reads_and_writes_give_the_plain_loops_files(tmp_path, tokenizer, monkeypatch):
    """OVERLAP (the next tensor read and the last shard written by threads beside the arithmetic) changes when
    bytes move, never which: every file of the output folder is byte for byte the plain loop's."""
    from quantune import stream

    src = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(src, max_shard_size="60KB")
    tokenizer.save_pretrained(src)
    assert len(checkpoint_shards(src)) > 2
    cfg = QuantConfig(bits=4, group_size=32)
    for overlap in (True, False):
        monkeypatch.setattr(stream, "OVERLAP", overlap)
        quantize_checkpoint(src, tmp_path / f"out-{overlap}", cfg, progress=False)
    a, b = tmp_path / "out-True", tmp_path / "out-False"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and any(n.endswith(".safetensors") for n in names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_write_behind_leaves_nothing(overlap, tmp_path, tokenizer, monkeypatch):
    """A shard whose write fails in the writer thread fails the run, and no output folder is left."""
    from quantune import stream

    monkeypatch.setattr(stream, "OVERLAP", overlap)
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        stream.quantize_checkpoint(src, tmp_path / "out", QuantConfig(bits=4), progress=False)
    assert calls and not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_streaming_refuses_renamed_tensors_and_leaves_nothing(tmp_path, tokenizer):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key.replace("q_proj", "query")] = tensors.pop(key)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantuneError, match="tensor names do not match"):
        quantize_checkpoint(src, tmp_path / "out", QuantConfig(bits=4), progress=False)
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_streaming_needs_safetensors_and_uniform_widths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantuneError, match="no model.safetensors"):
        checkpoint_shards(tmp_path / "empty")
    with pytest.raises(QuantuneError, match="does not mix widths"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "o", QuantConfig(bits=3, target_bits=3.5))


def test_cli_quantize_stream_writes_a_complete_folder_with_report(tiny_folders, text_file, tmp_path):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "streamed"
    r = CliRunner().invoke(main, ["quantize", str(tiny_folders["qwen2"]), "--bits", "4", "--stream", "--out", str(out),
                                  "--eval-data", str(text_file), "--eval-seq-len", "64", "--eval-windows", "2"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["streamed"] and report["eval"]["results"]["quantized"]["kl"] > 0
    assert report["summary"]["quantized_layers"] == len(report["layers"])
    r = CliRunner().invoke(main, ["quantize", str(tiny_folders["qwen2"]), "--stream", "--device", "cuda",
                                  "--out", str(tmp_path / "x")], catch_exceptions=False)
    if not torch.cuda.is_available():
        assert r.exit_code != 0 and "no cuda gpu" in r.output.lower()
