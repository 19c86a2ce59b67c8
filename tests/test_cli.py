"""The CLI end to end on tiny local models, including every bad input the spine names."""
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from quantune.config import FORMAT_VERSION


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, input=input)
    return result


def assert_one_line_error(result, pattern: str):
    assert result.exit_code != 0
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("Error: "), result.output
    assert pattern.lower() in lines[-1].lower(), lines[-1]


def no_folder_left(parent: Path, name: str) -> bool:
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


@pytest.fixture(scope="module")
def quantized(tiny_folders, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama-k4"
    result = run("quantize", tiny_folders["llama"], "--bits", 4, "--out", out,
                 "--eval-data", text_file, "--eval-seq-len", 64, "--eval-windows", 3)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quantize_writes_a_complete_folder(quantized):
    out, output = quantized
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json", "report.md"} <= names
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "quantune" and qc["method"] == "kashin" and qc["bits"] == 4
    assert qc["format_version"] == FORMAT_VERSION and "lm_head" in qc["modules_in_full_precision"]
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["quantized_layers"] == 14 and 4 < s["bpw_quantized_layers"] < 6
    assert s["file_bytes"] == (out / "model.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored_bits = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8 for k in f.keys())
    params = s["quantized_params"] + s["full_precision_params"]
    assert s["bpw_whole_model"] == pytest.approx(stored_bits / params)
    assert s["full_precision_params"] == 320 * 64 + 5 * 64  # tied embedding/head + 5 RMSNorm weights
    ev = report["eval"]["results"]
    assert ev["original"]["kl"] == 0 and ev["quantized"]["kl"] > 0
    assert math.isfinite(ev["quantized"]["ppl"])
    assert "3 non-overlapping windows of 64 tokens" in report["eval"]["protocol"]
    assert "bits per weight" in output and "perplexity" in output  # summary table printed
    md = (out / "report.md").read_text()
    assert "## Layers" in md and "model.layers.0.mlp.down_proj" in md


def test_eval_reports_perplexity_and_kl(quantized, tiny_folders, text_file):
    out, _ = quantized
    result = run("eval", out, "--data", text_file, "--seq-len", 64, "--windows", 3,
                 "--reference", tiny_folders["llama"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Run on cpu, float32." in result.output
    report = json.loads((out / "eval_report.json").read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert "Run on cpu, float32." in (out / "eval_report.md").read_text()
    metrics = report["results"][str(out)]
    quant = json.loads((out / "report.json").read_text())["eval"]["results"]["quantized"]
    # the reloaded folder scores exactly what the in-memory quantized model scored
    assert metrics["ppl"] == pytest.approx(quant["ppl"], rel=1e-6)
    assert metrics["kl"] == pytest.approx(quant["kl"], rel=1e-5, abs=1e-7)
    assert (out / "eval_report.md").is_file()


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "opt"])
def test_rtn_asymmetric_on_other_families(family, tiny_folders, tmp_path):
    out = tmp_path / "x"
    result = run("quantize", tiny_folders[family], "--bits", 3, "--method", "rtn", "--group-size", 32,
                 "--asymmetric", "--out", out, "--no-eval")
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "rtn" and qc["symmetric"] is False and qc["group_size"] == 32


def test_unknown_model(tmp_path):
    result = run("quantize", "no-such-model", "--out", tmp_path / "o")
    assert_one_line_error(result, "model not found")
    assert no_folder_left(tmp_path, "o")


@pytest.mark.parametrize("bits", [1, 9, 1.5, 8.5])
def test_bits_out_of_range(bits, tiny_folders, tmp_path):
    result = run("quantize", tiny_folders["llama"], "--bits", bits, "--out", tmp_path / "o")
    assert_one_line_error(result, "bits must be")
    assert no_folder_left(tmp_path, "o")


def test_unsupported_layer(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run("quantize", folder, "--out", tmp_path / "o", "--no-eval")
    assert_one_line_error(result, "unsupported layer")
    assert no_folder_left(tmp_path, "o")


def test_nan_weights(tiny_folders, tmp_path, tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run("quantize", folder, "--out", tmp_path / "o", "--no-eval")
    assert_one_line_error(result, "nan")
    assert "up_proj" in result.output
    assert no_folder_left(tmp_path, "o")


def test_existing_output_needs_overwrite(quantized, tiny_folders):
    out, _ = quantized
    result = run("quantize", tiny_folders["llama"], "--out", out, "--no-eval")
    assert_one_line_error(result, "already exists")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(quantized, tmp_path, damage):
    import shutil

    out, _ = quantized
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    result = run("eval", broken, "--seq-len", 32, "--windows", 1)
    assert_one_line_error(result, "safetensors")


def test_newer_format_version_is_refused(quantized, tmp_path):
    import shutil

    out, _ = quantized
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    result = run("eval", newer, "--seq-len", 32, "--windows", 1)
    assert_one_line_error(result, "format version 99")


def test_missing_eval_data_fails_before_quantizing(tiny_folders, tmp_path):
    result = run("quantize", tiny_folders["llama"], "--out", tmp_path / "o", "--eval-data", tmp_path / "none.txt")
    assert_one_line_error(result, "data file not found")
    assert no_folder_left(tmp_path, "o")


def test_missing_gguf_file(tmp_path):
    assert_one_line_error(run("quantize", tmp_path / "model.gguf", "--out", tmp_path / "o"), "gguf file not found")


def test_wikitext2_without_network_is_a_clear_error(quantized, monkeypatch):
    import quantune.data

    def offline(split="test"):
        raise quantune.data.QuantuneError("could not load wikitext2 (no network or hub access?): offline")

    monkeypatch.setattr(quantune.data, "wikitext2_text", offline)
    out, _ = quantized
    assert_one_line_error(run("eval", out, "--data", "wikitext2"), "wikitext2")


def test_eval_of_a_float_model_reports_under_out(tiny_folders, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("eval", tiny_folders["opt"], "--data", text_file, "--seq-len", 64, "--windows", 2)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "eval-opt" / "eval_report.json").read_text())
    assert report["quantized"] is False and report["results"][str(tiny_folders["opt"])]["tokens"] == 2 * 63
    assert not (tiny_folders["opt"] / "eval_report.json").exists()  # the user's model folder is untouched


def test_bfloat16_full_precision_parameters(tiny_folders, text_file, tmp_path):
    out = tmp_path / "bf16"
    result = run("quantize", tiny_folders["qwen2"], "--bits", 4, "--dtype", "bfloat16", "--out", out,
                 "--eval-data", text_file, "--eval-seq-len", 64, "--eval-windows", 2)
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.up_proj.codes").dtype == torch.uint8
        assert f.get_tensor("model.layers.0.mlp.up_proj.coeffs").dtype == torch.float16
    report = json.loads((out / "report.json").read_text())
    assert report["full_precision_dtype"] == "bfloat16"
    float32 = tmp_path / "fp32"
    assert run("quantize", tiny_folders["qwen2"], "--bits", 4, "--out", float32, "--no-eval").exit_code == 0
    assert (out / "model.safetensors").stat().st_size < (float32 / "model.safetensors").stat().st_size
    # the folder, loaded as stored, scores exactly what the in-memory bfloat16 model scored
    assert run("eval", out, "--data", text_file, "--seq-len", 64, "--windows", 2, "--device", "cpu").exit_code == 0
    assert json.loads((out / "eval_report.json").read_text())["dtype"] == "bfloat16"  # as stored
    reloaded = json.loads((out / "eval_report.json").read_text())["results"][str(out)]
    assert reloaded["ppl"] == pytest.approx(report["eval"]["results"]["quantized"]["ppl"], rel=1e-6)


def test_fractional_bits_write_a_mixed_width_folder_that_loads(tiny_folders, tmp_path):
    from quantune.qlinear import QuantLinear
    from quantune.serialization import load

    out = tmp_path / "mixed"
    result = run("quantize", tiny_folders["llama"], "--bits", 2.5, "--out", out, "--no-eval")
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 2 and qc["target_bits"] == 2.5 and set(qc["module_bits"].values()) == {3}
    report = json.loads((out / "report.json").read_text())
    assert {L["bits"] for L in report["layers"].values()} == {2, 3}
    assert "layers at the wider width" in (out / "report.md").read_text()
    model, _ = load(out)
    widths = {m.qconfig.bits for m in model.modules() if isinstance(m, QuantLinear)}
    assert widths == {2, 3}


def test_generate_continues_a_prompt_greedily(quantized, tokenizer):
    """The text, and with --json the token ids and timings: transformers' own greedy tokens."""
    from quantune import load
    from tests.test_generate import reference_tokens

    out, _ = quantized
    result = run("generate", out, "--prompt", "The quick brown", "--max-new-tokens", 12, "--no-stop", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    model, tok = load(out)
    ids = tok("The quick brown", return_tensors="pt").input_ids
    assert got["tokens"] == reference_tokens(model, ids, 12)
    assert got["new_tokens"] == 12 and got["prompt_tokens"] == ids.shape[1] and got["quantized"]
    assert got["text"] == tok.decode(got["tokens"], skip_special_tokens=True)
    assert got["mode"] == "eager" and got["device"] == "cpu" and got["decode_tokens_per_s"] > 0
    plain = run("generate", out, "--prompt", "-", "--max-new-tokens", 12, "--no-stop", input="The quick brown")
    assert plain.exit_code == 0 and plain.stdout == got["text"] + "\n"  # the text alone on stdout
    assert "12 new tokens after a" in plain.stderr and "tokens/s (eager, cpu, float32)" in plain.stderr


def test_generate_from_a_float_model_folder(tiny_folders):
    result = run("generate", tiny_folders["opt"], "--prompt", "Hello", "--max-new-tokens", 3, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert not got["quantized"] and 1 <= got["new_tokens"] <= 3


@pytest.mark.parametrize("args, pattern", [
    (["--mode", "graph"], "captures a CUDA graph"),
    (["--prompt", ""], "prompt is empty"),
    (["--max-new-tokens", 300], "exceeds the model's 256 positions"),
    (["--device", "tpu"], "unknown device 'tpu'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_generate_bad_requests(quantized, args, pattern):
    out, _ = quantized
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", "Hi", *[str(a) for a in args]])
    assert_one_line_error(result, pattern)


def test_generate_missing_model_and_bad_token_count(tmp_path):
    assert_one_line_error(run("generate", tmp_path / "nope", "--prompt", "Hi"), "model not found")
    result = run("generate", tmp_path, "--prompt", "Hi", "--max-new-tokens", 0)
    assert result.exit_code != 0 and "max-new-tokens" in result.output


def test_generate_on_the_cpu_decodes_each_quantized_weight_once(quantized, monkeypatch):
    """No kernels off the GPU: the layers' weights are decoded once for the whole generation, not per step."""
    from quantune.qlinear import QuantLinear

    out, _ = quantized
    calls, real = [], QuantLinear.dequantize
    monkeypatch.setattr(QuantLinear, "dequantize", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    result = run("generate", out, "--prompt", "The quick brown", "--max-new-tokens", 8, "--no-stop")
    assert result.exit_code == 0, result.output
    assert len(calls) == len(set(map(id, calls))) == 14  # 2 layers x 7 linear layers, each once


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_eval_on_a_gpu_that_is_not_there_is_a_one_line_error(quantized):
    out, _ = quantized
    assert_one_line_error(run("eval", out, "--seq-len", 32, "--windows", 1, "--device", "cuda"), "no CUDA GPU")
    assert_one_line_error(run("eval", out, "--seq-len", 32, "--windows", 1, "--device", "tpu"), "unknown device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_on_the_gpu_gives_the_cpu_figures(quantized, tiny_folders, text_file, tmp_path):
    """The same folder and reference evaluated on the GPU (float32: within float rounding of the CPU's figures; bf16:
    through the prefill kernels, close) and quantized with --device cuda (evaluated there too)."""
    out, _ = quantized
    args = ["--data", text_file, "--seq-len", 64, "--windows", 3, "--reference", tiny_folders["llama"]]
    figures = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        report_dir = tmp_path / f"{device}-{dtype}"
        result = run("eval", out, *args, "--device", device, "--dtype", dtype, "--report-dir", report_dir)
        assert result.exit_code == 0, result.output
        report = json.loads((report_dir / "eval_report.json").read_text())
        assert report["dtype"] == dtype and (report["device"] == "cpu") == (device == "cpu")
        figures[(device, dtype)] = report["results"][str(out)]
    cpu, gpu, half = figures[("cpu", "float32")], figures[("cuda", "float32")], figures[("cuda", "bfloat16")]
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4) and gpu["kl"] == pytest.approx(cpu["kl"], rel=1e-2, abs=1e-5)
    assert half["ppl"] == pytest.approx(cpu["ppl"], rel=0.02)
    on_gpu = tmp_path / "k4-cuda"
    result = run("quantize", tiny_folders["llama"], "--bits", 4, "--out", on_gpu, "--device", "cuda",
                 "--eval-data", text_file, "--eval-seq-len", 64, "--eval-windows", 3)
    assert result.exit_code == 0, result.output
    report = json.loads((on_gpu / "report.json").read_text())
    assert report["eval"]["device"] != "cpu" and math.isfinite(report["eval"]["results"]["quantized"]["ppl"])


def test_running_out_of_gpu_memory_is_a_one_line_error(quantized, monkeypatch):
    import quantune.pipeline

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nmore detail")

    monkeypatch.setattr(quantune.pipeline, "run_eval", oom)
    out, _ = quantized
    result = run("eval", out, "--seq-len", 32, "--windows", 1)
    assert_one_line_error(result, "the GPU ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)")
    assert "--device cpu" in result.output
