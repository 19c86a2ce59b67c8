"""Save -> load round trips give identical logits; writes are atomic."""
import pytest
import torch

from quantune.config import QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import quantize_model
from quantune.serialization import atomic_folder, load, save_model_files
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=2, group_size=32, transform="hadamard"),
                                 QuantConfig(method="rtn", bits=3, group_size=16, symmetric=False),
                                 QuantConfig(bits=2, target_bits=2.6)],
                         ids=["kashin4", "kashin2-g32-had", "rtn3-asym-g16", "kashin-mixed-2.6"])
def test_save_load_identical_logits(family, cfg, tmp_path, tokenizer):
    model = tiny_model(family)
    result = quantize_model(model, cfg, progress=False)
    with atomic_folder(tmp_path / "q") as tmp:
        save_model_files(model, tokenizer, result.config, tmp)
    loaded, _ = load(tmp_path / "q")
    ids = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    names = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(names) == sorted(result.layers)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_on_success(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(QuantuneError, match="already exists"):
        with atomic_folder(tmp_path / "out"):
            pass
    with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_load_rejects_a_float_folder(tiny_folders):
    with pytest.raises(QuantuneError, match="not a quantune-quantized folder"):
        load(tiny_folders["llama"])


def test_load_missing_folder(tmp_path):
    with pytest.raises(QuantuneError, match="not found"):
        load(tmp_path / "nothing")


def test_format_version_1_folders_still_load(tmp_path, tokenizer):
    import json

    model = tiny_model("llama")
    result = quantize_model(model, QuantConfig(bits=3), progress=False)
    with atomic_folder(tmp_path / "q") as tmp:
        save_model_files(model, tokenizer, result.config, tmp)
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    for key in ("module_bits", "target_bits"):  # fields that version 2 added
        qc.pop(key)
    qc["format_version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    loaded, _ = load(tmp_path / "q")
    ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
