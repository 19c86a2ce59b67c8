"""The memory estimator: model states by the book, traced activations, fit advice, the CLI."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from quantune.config import QuantConfig, QuantuneError
from quantune.memory import MemorySpec, _trace_forward, estimate, largest_batch, load_config, parse_size
from tests.conftest import tiny_config, tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "eval" / "configs"


def _lines(est):
    return {line.name: line.bytes for line in est.lines}


def test_gpt2_xl_mixed_precision_adam_is_16_bytes_per_parameter():
    """ZeRO's example: GPT-2 1.5B, mixed-precision Adam: 2 + 2 + 12 bytes per parameter, about 24 GB."""
    config = load_config(str(CONFIGS / "gpt2-xl"))
    est = estimate(config, MemorySpec(mode="full", param_dtype="bf16", master_weights=True, batch_size=1,
                                      seq_len=1024, grad_checkpointing=True))
    lines, n = _lines(est), est.parameters
    assert 1.5e9 < n < 1.6e9
    assert lines["weights"] == pytest.approx(2 * n, rel=1e-3)
    assert lines["gradients"] == 2 * n
    assert lines["optimizer states"] == 12 * n
    assert 23e9 < lines["weights"] + lines["gradients"] + lines["optimizer states"] < 26e9


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_activations_extrapolate_to_the_whole_model(mode):
    """Per-layer bytes traced on 1 and 2 layers at 32 and 64 tokens predict the saved bytes of the
    whole model at another token count."""
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    spec = MemorySpec(mode=mode, bits=2, batch_size=1, seq_len=96, lora_r=4)
    est = estimate(config, spec)
    direct, _ = _trace_forward(config, spec, 3, 96)
    # `outside` is clamped at zero and the embedding's integer ids are outside the layers: allow a few bytes
    assert _lines(est)["activations"] == pytest.approx(direct, rel=0.02)


def test_quantized_weights_count_the_stored_format():
    config = tiny_config("llama")
    est = estimate(config, MemorySpec(mode="qlora", bits=2, batch_size=1, seq_len=32))
    model = tiny_model("llama")
    from quantune.quantize import quantize_model

    quantize_model(model, QuantConfig(bits=2), progress=False)
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert _lines(est)["weights"] == pytest.approx(stored, rel=1e-6)


def test_quantization_and_checkpointing_lower_the_estimate():
    config = load_config(str(CONFIGS / "smollm2-135m"))
    peak = {(m, c): estimate(config, MemorySpec(mode=m, batch_size=8, seq_len=1024, grad_checkpointing=c)).peak_bytes
            for m in ("full", "lora", "qlora") for c in (False, True)}
    for m in ("full", "lora", "qlora"):
        assert peak[m, True] < peak[m, False]
    assert peak["qlora", False] < peak["lora", False] < peak["full", False]


def test_largest_batch_fits_and_the_next_does_not():
    config = load_config(str(CONFIGS / "smollm2-135m"))
    spec = MemorySpec(mode="qlora", batch_size=8, seq_len=1024, grad_checkpointing=True)
    limit = 3 * 2 ** 30
    b = largest_batch(config, spec, limit)
    assert b >= 1
    fit = estimate(config, MemorySpec(mode="qlora", batch_size=b, seq_len=1024, grad_checkpointing=True))
    over = estimate(config, MemorySpec(mode="qlora", batch_size=b + 1, seq_len=1024, grad_checkpointing=True))
    assert fit.peak_bytes + fit.fragmentation_bytes <= limit < over.peak_bytes + over.fragmentation_bytes


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2 ** 30), ("80GB", 80e9), ("512 MiB", 512 * 2 ** 20),
                                        ("1000", 1000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-3GB", "12XB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(QuantuneError):
        parse_size(text)


def test_bad_spec_is_a_clear_error():
    with pytest.raises(QuantuneError, match="batch size"):
        estimate(tiny_config("llama"), MemorySpec(batch_size=0))
    with pytest.raises(QuantuneError, match="bits"):
        estimate(tiny_config("llama"), MemorySpec(mode="qlora", bits=1))


def _memory(*args):
    return CliRunner().invoke(main, ["memory", *[str(a) for a in args]])


def test_cli_memory_table_report_and_fit(tiny_folders, tmp_path):
    folder = tiny_folders["llama"]
    r = _memory(folder, "--mode", "lora", "--bits", "4", "--batch-size", 2, "--seq-len", 64, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "predicted peak (allocated)" in r.output and "mode qlora" in r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["peak_bytes"] == pytest.approx(sum(line["bytes"] for line in report["lines"]))
    yes = _memory(folder, "--batch-size", 2, "--seq-len", 64, "--max-memory", "80GB")
    assert yes.exit_code == 0 and "Fits in" in yes.output and ": yes" in yes.output
    no = _memory(folder, "--batch-size", 2, "--seq-len", 64, "--max-memory", "1MiB")
    assert no.exit_code == 3 and ": no" in no.output


def test_cli_memory_reads_a_quantized_folder(tiny_folders, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(tiny_folders["llama"]), "--bits", "2", "--out", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    r = _memory(out, "--seq-len", 64)
    assert r.exit_code == 0 and "kashin 2-bit base" in r.output, r.output
    r = _memory(out, "--mode", "full")
    assert r.exit_code == 1 and "full fine-tuning needs the original model" in r.output


@pytest.mark.parametrize("args,message", [
    (["no/such/folder/here"], "model not found"),
    (["{folder}", "--max-memory", "plenty"], "cannot read memory size"),
    (["{folder}", "--batch-size", "0"], "batch size must be >= 1"),
])
def test_cli_memory_bad_input(tiny_folders, args, message):
    args = [a.format(folder=tiny_folders["llama"]) for a in args]
    r = _memory(*args)
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_the_trace_leaves_no_model_behind(monkeypatch):
    """Saved tensors are held only during the forward: no reference cycle keeps the traced copy alive."""
    import gc
    import weakref

    import quantune.memory as memory

    built = []
    real = memory._build

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append(weakref.ref(next(model.parameters())))
        return model

    monkeypatch.setattr(memory, "_build", spy)
    memory._trace_forward(tiny_config("llama"), MemorySpec(mode="full"), 2, 32)
    gc.collect()
    assert built and all(ref() is None for ref in built)
