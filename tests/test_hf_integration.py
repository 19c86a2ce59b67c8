"""transformers' own AutoModelForCausalLM.from_pretrained loads quantune folders exactly.

Tiny models built from configs (see conftest), no downloads, fixed seeds, CPU.
"""
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as hf_auto

import quantune.hf_integration as hfi
from quantune.config import FORMAT_VERSION, QUANT_METHOD, QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import quantize_model
from tests.conftest import FAMILIES, tiny_model

CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "opt": "OPTForCausalLM"}
CONFIGS = {
    "kashin4": QuantConfig(),
    "rtn4-sym-g32": QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True),
    "rtn3-asym-g32": QuantConfig(method="rtn", bits=3, group_size=32, symmetric=False),
    "rtn2-asym-row": QuantConfig(method="rtn", bits=2, group_size=None, symmetric=False),
    "rtn5-sym-g16": QuantConfig(method="rtn", bits=5, group_size=16, symmetric=True),
}
# every family with kashin and two rtn variants; the other rtn variants on one family each
CASES = [(f, c) for f in FAMILIES for c in ("kashin4", "rtn4-sym-g32", "rtn3-asym-g32")] + \
        [("llama", "rtn2-asym-row"), ("opt", "rtn5-sym-g16")]




def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (2, 11), generator=g)


def _quantized_folder(tmp_path, family="llama", cfg=QuantConfig(method="rtn", bits=4, group_size=32), name="q"):
    model = tiny_model(family)
    result = quantize_model(model, cfg, progress=False)
    model.config.quantization_config = result.config.to_dict()
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, result, folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _edit_quant_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"].update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("family,cfg_name", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_from_pretrained_bit_identical(family, cfg_name, tmp_path):
    model, result, folder = _quantized_folder(tmp_path, family, CONFIGS[cfg_name])
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded).__name__ == CLASSES[family]

    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))

    # exactly the quantized modules are QuantLinear, with the stored buffers and dtypes
    want = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(got) == set(want) == set(result.layers)
    for name, module in got.items():
        assert module.qconfig == result.config
        for key, ref in want[name].buffers_dict().items():
            buf = getattr(module, key)
            assert buf.dtype == ref.dtype and torch.equal(buf, ref), f"{name}.{key}"
        assert module.codes.dtype == torch.uint8
        assert all(getattr(module, k).dtype == torch.float16 for k in module.buffer_names if k != "codes")
    # what was kept stays a float Linear; ties survive loading
    for name in result.full_precision:
        assert not isinstance(loaded.get_submodule(name), QuantLinear)
    tied = bool(loaded.config.tie_word_embeddings)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    assert tied == (family != "qwen2")

    assert isinstance(loaded.hf_quantizer, hfi.QuantuneHfQuantizer)
    assert loaded.is_quantized
    assert loaded.config.quantization_config.to_quant_config().to_dict() == result.config.to_dict()


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16], ids=["default", "fp32", "bf16"])
def test_load_dtype_keeps_buffer_dtypes(dtype, tmp_path):
    model, _, folder = _quantized_folder(tmp_path, "llama", QuantConfig())
    loaded = AutoModelForCausalLM.from_pretrained(folder, **({} if dtype is None else {"dtype": dtype}))
    float_dtype = dtype or torch.float32  # default: "auto", the config's float32
    assert loaded.dtype == float_dtype
    assert loaded.get_input_embeddings().weight.dtype == float_dtype
    qls = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert qls
    for m in qls:
        assert m.codes.dtype == torch.uint8 and m.coeffs.dtype == torch.float16
    out, ref = _logits(loaded, _ids()), _logits(model, _ids())
    assert out.dtype == float_dtype
    if float_dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_keep_in_fp32_modules_does_not_change_stored_dtypes(tmp_path, monkeypatch):
    # a model's fp32 dtype plan makes both 5.17 and 5.24 upcast float16 buffers under it on load;
    # the quantizer puts the stored float16 back (exactly)
    from transformers import LlamaForCausalLM

    model, _, folder = _quantized_folder(tmp_path, "llama", QuantConfig())
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules", ["mlp"])
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["mlp"])
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    want = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in loaded.named_modules():
        if isinstance(module, QuantLinear):
            assert module.codes.dtype == torch.uint8 and module.coeffs.dtype == torch.float16, name
            assert torch.equal(module.coeffs, want[name].coeffs) and torch.equal(module.codes, want[name].codes)


def test_save_pretrained_of_loaded_model_round_trips(tmp_path):
    model, _, folder = _quantized_folder(tmp_path, "gemma3", QuantConfig(method="rtn", bits=3, symmetric=False))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.hf_quantizer.is_serializable() and loaded.hf_quantizer.is_trainable
    loaded.save_pretrained(tmp_path / "again")
    qc = lambda f: json.loads((f / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "again") == qc(folder)
    assert qc(folder)["quant_method"] == QUANT_METHOD
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == load_file(folder / "model.safetensors").keys()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again, _ids()), _logits(model, _ids()))


def test_colocated_model_saves_and_reloads_the_same(tmp_path):
    """A model whose siblings were stored back to back for one-launch inference (compile_model does
    it) still saves every layer's own codes: transformers clones tensors that share storage."""
    from quantune.qlinear import colocate_siblings

    model, _, folder = _quantized_folder(tmp_path, "llama", QuantConfig(method="rtn", bits=4, group_size=32))
    want = _logits(model, _ids())
    assert colocate_siblings(model) > 0
    model.save_pretrained(tmp_path / "colocated")
    assert load_file(tmp_path / "colocated" / "model.safetensors").keys() == load_file(folder / "model.safetensors").keys()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "colocated")
    assert torch.equal(_logits(again, _ids()), want)


def test_wrong_format_version_is_a_clear_error(tmp_path):
    _, _, folder = _quantized_folder(tmp_path)
    _edit_quant_config(folder, format_version=99)
    with pytest.raises(QuantuneError, match=r"format version 99.*versions 1, 2"):
        AutoModelForCausalLM.from_pretrained(folder)
    # a newer format may add fields: the version is still what the error names
    _edit_quant_config(folder, format_version=99, field_of_the_future=True)
    with pytest.raises(QuantuneError, match="version 99"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_without_format_version_is_refused(tmp_path):
    _, _, folder = _quantized_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]["format_version"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantuneError, match="format_version"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_quantizing_on_load_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "float")
    with pytest.raises(QuantuneError, match=r"quantize_model.*quantune quantize"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfi.QuantuneHfConfig(bits=4))


def test_missing_quantized_tensor_is_a_clear_error(tmp_path):
    _, _, folder = _quantized_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.codes"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantuneError, match=r"lacks quantized tensors model\.layers\.1\.mlp\.down_proj\.codes"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_buffer_shape_mismatch_is_an_error(tmp_path):
    # transformers 5.17 skips its own shape check when a quantizer is active; quantune checks
    _, _, folder = _quantized_folder(tmp_path)  # rtn, group 32
    _edit_quant_config(folder, group_size=16)
    with pytest.raises((QuantuneError, RuntimeError), match="mismatch"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_dequantize_gives_float_linears(tmp_path):
    model, _, folder = _quantized_folder(tmp_path, "qwen2")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, nn.Linear)
    assert getattr(loaded.config, "quantization_config", None) is None
    assert torch.equal(_logits(loaded, _ids()), _logits(model, _ids()))


def test_config_class_round_trip():
    qcfg = QuantConfig(method="rtn", bits=3, group_size=64, symmetric=False,
                       modules_in_full_precision={"lm_head": "output head"})
    hf_cfg = hfi.QuantuneHfConfig.from_quant_config(qcfg)
    assert hf_cfg.quant_method == QUANT_METHOD and hf_cfg.format_version == FORMAT_VERSION
    assert hf_cfg.to_dict() == qcfg.to_dict() == dict(hf_cfg)
    assert hf_cfg.to_quant_config().to_dict() == qcfg.to_dict()
    assert json.loads(hf_cfg.to_json_string())["bits"] == 3
    with pytest.raises(QuantuneError, match="bits"):
        hfi.QuantuneHfConfig(bits=11)


def test_registration_is_idempotent_and_survives_reload(tmp_path):
    model, _, folder = _quantized_folder(tmp_path)
    names = ("QuantuneHfConfig", "QuantuneHfQuantizer")
    originals = {n: getattr(hfi, n) for n in names}
    try:
        import quantune.hf_integration  # noqa: F401  (a second import is a no-op)

        hfi.register()
        hfi.register()
        importlib.reload(hfi)
        importlib.reload(hfi)
        assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is hfi.QuantuneHfConfig
        assert hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is hfi.QuantuneHfQuantizer
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert type(loaded.hf_quantizer) is hfi.QuantuneHfQuantizer
        assert torch.equal(_logits(loaded, _ids()), _logits(model, _ids()))
    finally:  # put the classes other tests imported back in place
        for n, cls in originals.items():
            setattr(hfi, n, cls)
        hfi.register()
    assert hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is originals["QuantuneHfQuantizer"]


def test_foreign_registration_under_our_name_is_an_error():
    mapping = hf_auto.AUTO_QUANTIZER_MAPPING
    ours = mapping[QUANT_METHOD]

    class Foreign(hf_auto.HfQuantizer):
        pass

    mapping[QUANT_METHOD] = Foreign
    try:
        with pytest.raises(QuantuneError, match="already has a quantization method 'quantune'"):
            hfi.register()
    finally:
        mapping[QUANT_METHOD] = ours


def test_generate_with_a_static_cache_compiles_the_loaded_model_in_one_graph(tmp_path):
    """transformers' generate compiles the forward of a model loaded from a quantune folder when the cache is
    static (on a GPU by default; here on the CPU through CompileConfig's all-devices switch)."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=True, mode="default")
    if not hasattr(config, "_compile_all_devices"):
        pytest.skip("this transformers compiles in generate on accelerators only")
    config._compile_all_devices = True
    _, _, folder = _quantized_folder(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.hf_quantizer.is_compileable
    ids = _ids()[:1]
    eager = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = loaded.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                               compile_config=config)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward was compiled (fullgraph)
    assert not torch._dynamo.utils.counters["graph_break"]
