"""quantune inspect on a tiny quantized folder."""
import json

import pytest
from click.testing import CliRunner

from cli import main
from quantune.inspect import crest_factor
from quantune.quantize import quantize_model
from quantune.config import QuantConfig
from quantune.serialization import atomic_folder, save_model_files
from tests.conftest import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["kashin", "rtn"])
def test_inspect_writes_table_and_plots(method, tmp_path, tokenizer, tiny_folders):
    model = tiny_model("llama")
    result = quantize_model(model, QuantConfig(method=method, bits=3), progress=False)
    with atomic_folder(tmp_path / "q") as tmp:
        save_model_files(model, tokenizer, result.config, tmp)
        (tmp / "report.json").write_text(json.dumps({"layers": result.layers}))
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "q"), "--original", str(tiny_folders["llama"]),
                                    "--layers", "4"])
    assert out.exit_code == 0, out.output
    folder = tmp_path / "q" / "inspect"
    for png in ("factor_histograms.png", "layer_errors.png"):
        assert (folder / png).read_bytes()[:8] == PNG
    summary = json.loads((folder / "inspect.json").read_text())
    assert set(summary["layers"]) == set(result.layers)
    for name, row in summary["layers"].items():
        # measured against the original, the error equals the one recorded at quantization time
        assert row["rel_error"] == pytest.approx(result.layers[name]["rel_error"], rel=1e-4)
        assert ("crest_U" in row) == (method == "kashin") and row["crest_w"] > 0
    assert "model.layers.1.mlp.down_proj" in (folder / "inspect.md").read_text()


def test_crest_factor():
    import torch

    assert crest_factor(torch.ones(10)) == pytest.approx(1.0)
    x = torch.zeros(100)
    x[0] = 1.0
    assert crest_factor(x) == pytest.approx(10.0)
    assert crest_factor(torch.zeros(5)) == 0.0


def test_inspect_rejects_a_float_folder(tiny_folders):
    out = CliRunner().invoke(main, ["inspect", str(tiny_folders["llama"])])
    assert out.exit_code == 1 and "not a quantune-quantized folder" in out.output
