"""LoRA fine-tuning on tiny quantized models (CPU): loop, accumulation, resume, adapters, merge, CLI."""
import copy
import math
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from quantune.config import QuantConfig, QuantuneError
from quantune.data import BatchOrder, pack_documents
from quantune.lora import attach_lora, load_adapter, lora_layers, make_lora_config, merge_into_float, residual_init
from quantune.quantize import quantize_model
from quantune.train import TrainConfig, compute_loss, distillation_loss, train
from tests.conftest import tiny_model

CPU = torch.device("cpu")


def _quantized(bits=2, seed=0):
    torch.manual_seed(seed)
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    quantize_model(model, QuantConfig(bits=bits), progress=False)
    return model, original


def _data(n=24, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: repeated short motifs
    motifs = torch.randint(3, 300, (4, 4), generator=g)
    rows = [motifs[torch.randint(0, 4, (seq // 4,), generator=g)].reshape(-1) for _ in range(n)]
    return torch.stack(rows)


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=16, lr=5e-3, schedule="constant", precision="fp32", log_every=0,
                max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def _peft(bits=2, r=4, dropout=0.0, seed=0):
    model, original = _quantized(bits, seed)
    torch.manual_seed(seed)
    return attach_lora(model, make_lora_config(r=r, alpha=2 * r, dropout=dropout)), original


def test_a_few_steps_lower_the_loss(tmp_path):
    pm, _ = _peft()
    data = _data()
    hist = train(pm, data, _cfg(steps=12), out_dir=tmp_path, device=CPU, log=lambda *_: None)
    losses = [s["loss"] for s in hist["steps"]]
    assert losses[-1] < losses[0] - 0.5
    base_params = [p for n, p in pm.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base_params)


def test_gradient_accumulation_matches_the_large_batch():
    data = _data(n=8)
    grads = []
    for batch_size, accum in ((8, 1), (2, 4)):
        pm, _ = _peft()
        cfg = _cfg(batch_size=batch_size, grad_accum=accum)
        order = BatchOrder(len(data), batch_size, accum, seed=0)
        for micro in range(accum):
            loss, _ = compute_loss(pm, data[order.indices(0, micro)], cfg)
            (loss / accum).backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_batch_order_is_a_deterministic_partition_per_epoch():
    order = BatchOrder(12, batch_size=2, grad_accum=3, seed=5)
    epoch0 = [i for step in range(2) for m in range(3) for i in order.indices(step, m)]
    assert sorted(epoch0) == list(range(12))
    assert epoch0 == [i for step in range(2) for m in range(3) for i in BatchOrder(12, 2, 3, 5).indices(step, m)]
    ranks = [BatchOrder(12, 2, 3, 5, world=2, rank=r) for r in range(2)]
    split = sorted(i for r in ranks for m in range(3) for i in r.indices(0, m))
    assert split == list(range(12))  # the two ranks share one global batch without overlap


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    data = _data()
    cfg = _cfg(steps=6, save_every=3)
    pm, _ = _peft(dropout=0.1)
    full = train(pm, data, cfg, out_dir=tmp_path / "full", device=CPU, log=lambda *_: None)

    pm2, _ = _peft(dropout=0.1)
    part = train(pm2, data, _cfg(steps=6, save_every=3), out_dir=tmp_path / "part", device=CPU,
                 log=lambda *_: None)
    # drop the final checkpoint: resume from step 3 as if the run had stopped there
    import shutil
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000006")
    pm3, _ = _peft(dropout=0.1, seed=1)  # other init: everything must come from the checkpoint
    resumed = train(pm3, data, _cfg(steps=6, save_every=3), out_dir=tmp_path / "part", device=CPU, resume=True,
                    log=lambda *_: None)
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"]]
    assert part["steps"][-1]["loss"] == full["steps"][-1]["loss"]


def test_interrupt_saves_a_checkpoint(tmp_path, monkeypatch):
    import quantune.train as train_mod

    pm, _ = _peft()
    calls = {"n": 0}
    real = train_mod.CausalLMLoss.forward

    def interrupt_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod.CausalLMLoss, "forward", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(pm, _data(), _cfg(steps=6), out_dir=tmp_path, device=CPU, log=lambda *_: None)
    assert (tmp_path / "checkpoints" / "step-000002" / "training_state.safetensors").is_file()


def test_distillation_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 11)
    assert float(distillation_loss(logits, logits.clone(), temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(2, 5, 11))) > 0.01


def test_distillation_trains_toward_the_teacher(tmp_path):
    pm, original = _peft()
    hist = train(pm, _data(), _cfg(steps=10, objective="kd"), out_dir=tmp_path, device=CPU, teacher=original,
                 log=lambda *_: None)
    kd = [s["kd"] for s in hist["steps"]]
    assert kd[-1] < kd[0]
    with pytest.raises(QuantuneError, match="teacher"):
        train(pm, _data(), _cfg(objective="kd"), out_dir=tmp_path / "x", device=CPU, log=lambda *_: None)


def test_residual_init_reduces_the_weight_error_and_the_output_gap():
    pm, original = _peft(r=8)
    ids = _data(n=2)
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        before = (pm(input_ids=ids).logits - ref).pow(2).mean()
    stats = residual_init(pm, original)
    assert stats and all(s["after"] < s["before"] for s in stats.values())
    with torch.no_grad():
        after = (pm(input_ids=ids).logits - ref).pow(2).mean()
    assert after < before


def test_adapter_save_and_peft_load_give_identical_logits(tmp_path):
    pm, _ = _peft()
    train(pm, _data(), _cfg(steps=3), out_dir=tmp_path / "run", device=CPU, log=lambda *_: None)
    pm.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    fresh, _ = _quantized()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    ids = _data(n=2)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    pm, _ = _peft()
    pm.save_pretrained(tmp_path / "adapter")
    other = tiny_model("opt")
    quantize_model(other, QuantConfig(bits=2), progress=False)
    with pytest.raises(QuantuneError, match="another model|does not fit"):
        load_adapter(other, tmp_path / "adapter")


def test_merge_matches_base_plus_adapter():
    pm, original = _peft(r=4)
    residual_init(pm, original)  # a non-zero adapter
    ids = _data(n=2)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        merged = merge_into_float(pm)
        got = merged(input_ids=ids).logits
    assert not any(type(m).__name__ in ("QuantLinear", "QuantLoraLinear") for m in merged.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_settings_are_validated():
    with pytest.raises(QuantuneError, match="rank"):
        make_lora_config(r=0)
    model, _ = _quantized()
    with pytest.raises(QuantuneError, match="names no quantized layer"):
        attach_lora(model, make_lora_config(r=2, target_modules=["nope"]))


def test_pack_documents_fills_full_sequences(tokenizer):
    data = pack_documents(tokenizer, ["hello world " * 50, "another text " * 40], 16)
    assert data.shape[1] == 16 and data.dtype == torch.long and len(data) > 3
    with pytest.raises(QuantuneError, match="fewer than one sequence"):
        pack_documents(tokenizer, ["hi"], 512)


# ---- CLI end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_folder(tiny_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "llama-k2"
    result = CliRunner().invoke(main, ["quantize", str(tiny_folders["llama"]), "--bits", "2", "--out", str(out),
                                       "--no-eval"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_finetune_eval_merge(quantized_folder, tiny_folders, text_file, tmp_path):
    out = tmp_path / "lora"
    r = _run("finetune", quantized_folder, "--data", text_file, "--eval-data", text_file, "--eval-windows", 2,
             "--steps", 4, "--batch-size", 2, "--grad-accum", 2, "--seq-len", 32, "--lr", 1e-3, "--schedule", "wsd",
             "--warmup-steps", 1, "--lora-r", 4, "--teacher", tiny_folders["llama"], "--init", "residual",
             "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["objective"] == "kd" and report["lora"]["init"] == "residual"
    assert report["ppl_before"] > 0 and report["ppl_after"] > 0 and report["trainable_parameters"] > 0
    assert len(report["history"]["steps"]) == 4 and (out / "curves.png").is_file()
    assert "perplexity before -> after" in (out / "report.md").read_text()
    assert (out / "adapter_model.safetensors").is_file()
    prediction = report["memory_prediction"]
    assert prediction["peak_bytes"] > prediction["lines"]["weights"] > 0, prediction
    assert prediction["lines"]["teacher model"] > 0  # distillation keeps the original model in memory

    r = _run("eval", quantized_folder, "--adapter", out, "--data", text_file, "--seq-len", 32, "--windows", 2)
    assert r.exit_code == 0, r.output
    assert (out / "eval_report.json").is_file()

    r = _run("generate", quantized_folder, "--adapter", out, "--prompt", "It is", "--max-new-tokens", 6,
             "--no-stop", "--json")
    assert r.exit_code == 0, r.output
    from quantune import load
    from quantune.lora import load_adapter
    from tests.test_generate import reference_tokens

    base, tok = load(quantized_folder)
    with_adapter = load_adapter(base, out)
    assert json.loads(r.stdout)["tokens"] == reference_tokens(with_adapter, tok("It is", return_tensors="pt").input_ids, 6)

    merged = tmp_path / "merged"
    r = _run("merge", quantized_folder, "--adapter", out, "--out", merged, "--eval-data", text_file,
             "--eval-windows", 2, "--seq-len", 32)
    assert r.exit_code == 0, r.output
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg
    result = json.loads((merged / "merge_report.json").read_text())
    assert result["ppl_merged"] == pytest.approx(result["ppl_base_plus_adapter"], rel=1e-3)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(merged)  # a plain transformers folder


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.txt"], "data file not found"),
    (["--lora-r", "0"], "lora-r must be"),
    (["--seq-len", "100000"], "exceeds the model's"),
    (["--device", "cuda"], "no cuda gpu"),
])
def test_cli_finetune_bad_input(quantized_folder, text_file, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base = ["finetune", quantized_folder, "--steps", 1, "--out", tmp_path / "o"]
    if "--data" not in args:
        base += ["--data", text_file]
    r = _run(*base, *args)
    assert r.exit_code != 0
    assert message.lower() in r.output.strip().splitlines()[-1].lower(), r.output


def test_cli_finetune_empty_data(quantized_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = _run("finetune", quantized_folder, "--data", empty, "--steps", 1, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "empty" in r.output.lower()


def _ddp_worker(rank, world, port, out_dir, result_file):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from quantune import distributed

    dist = distributed.from_environment("cpu")
    try:
        pm, _ = _peft()
        hist = train(pm, _data(), _cfg(steps=4, batch_size=2), out_dir=Path(out_dir), device=CPU, dist=dist,
                     log=lambda *_: None)
        if rank == 0:
            Path(result_file).write_text(json.dumps([s["loss"] for s in hist["steps"]]))
    finally:
        dist.close()


def test_data_parallel_matches_one_process_with_the_same_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), str(result)), nprocs=2, join=True)
    ddp_losses = json.loads(result.read_text())
    pm, _ = _peft()
    single = train(pm, _data(), _cfg(steps=4, batch_size=4), out_dir=tmp_path / "one", device=CPU,
                   log=lambda *_: None)
    assert ddp_losses == pytest.approx([s["loss"] for s in single["steps"]], rel=1e-4)
    assert (tmp_path / "ddp" / "checkpoints" / "step-000004").is_dir()


def test_cached_weights_train_exactly_like_decoding_on_every_use(tmp_path):
    runs = []
    for cache in (False, True):
        pm, _ = _peft()
        hist = train(pm, _data(), _cfg(steps=3, cache_weights=cache), out_dir=tmp_path / str(cache), device=CPU,
                     log=lambda *_: None)
        runs.append([s["loss"] for s in hist["steps"]])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
    assert all(m._weight_cache is None for m in pm.modules() if hasattr(m, "_weight_cache"))


@pytest.mark.parametrize("precision,optimizer", [("bf16", "adamw"), ("fp16", "adamw"), ("fp32", "adamw8bit")])
def test_precisions_and_optimizers_train(tmp_path, precision, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    pm, _ = _peft()
    hist = train(pm, _data(), _cfg(steps=8, precision=precision, optimizer=optimizer, max_grad_norm=1.0),
                 out_dir=tmp_path, device=CPU, log=lambda *_: None)
    losses = [s["loss"] for s in hist["steps"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all("grad_norm" in s for s in hist["steps"])


def test_learning_rate_scaling_with_the_global_batch():
    cfg = TrainConfig(lr=1e-4, batch_size=8, grad_accum=4, lr_scaling="linear", base_batch_size=8)
    assert cfg.global_batch(world=2) == 64
    assert cfg.peak_lr(world=2) == pytest.approx(8e-4)
    assert TrainConfig(lr=1e-4, batch_size=8, grad_accum=4, lr_scaling="sqrt", base_batch_size=8).peak_lr() == \
        pytest.approx(2e-4)
    assert TrainConfig(lr=1e-4, batch_size=8, lr_scaling="linear").peak_lr() == pytest.approx(1e-4)


def test_rslora_and_target_modules_shape_the_adapter():
    model, _ = _quantized()
    pm = attach_lora(model, make_lora_config(r=4, alpha=8, rslora=True, target_modules=["q_proj", "v_proj"]))
    layers = lora_layers(pm)
    assert layers and all(n.endswith(("q_proj", "v_proj")) for n in layers)
    layer = next(iter(layers.values()))
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_cli_gpus_without_a_gpu_is_a_clear_error(quantized_folder, text_file, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import sys

    args = ["quantune", "finetune", str(quantized_folder), "--data", str(text_file), "--gpus", "2",
            "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = _run(*args[1:])
    assert r.exit_code != 0 and "no cuda gpu" in r.output.lower()


def test_merge_with_requantize_writes_a_quantized_folder(quantized_folder, text_file, tmp_path):
    from quantune.finetune import run_merge
    from quantune.serialization import load

    pm_dir = tmp_path / "adapter"
    model, _ = load(quantized_folder)
    pm = attach_lora(model, make_lora_config(r=2, alpha=4))
    pm.save_pretrained(pm_dir)
    result = run_merge(quantized_folder, pm_dir, tmp_path / "requant", requantize=True, eval_data=str(text_file),
                       eval_windows=2, seq_len=32)
    cfg = json.loads((tmp_path / "requant" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 2
    assert result["requantized"]["bits_per_weight"] > 2
    # a zero adapter (B = 0): merging changes nothing, re-quantizing the dequantized weights costs a little
    assert result["ppl_merged"] == pytest.approx(result["ppl_base_plus_adapter"], rel=1e-4)
    assert math.isfinite(result["ppl_requantized"])
    load(tmp_path / "requant")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_merge_on_a_gpu_that_is_not_there_is_a_one_line_error(quantized_folder, tmp_path):
    r = _run("merge", quantized_folder, "--adapter", tmp_path, "--out", tmp_path / "m", "--device", "cuda")
    assert r.exit_code != 0 and "no cuda gpu" in r.output.lower() and not (tmp_path / "m").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_on_the_gpu_gives_the_cpu_folders_figures(quantized_folder, text_file, tmp_path):
    """quantune merge --device cuda (merge, re-quantize on the GPU, evaluate there): a loadable quantized folder and
    perplexities within float rounding of the CPU run's for the merged model."""
    from quantune.serialization import load

    pm_dir = tmp_path / "adapter"
    model, _ = load(quantized_folder)
    attach_lora(model, make_lora_config(r=2, alpha=4)).save_pretrained(pm_dir)
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"requant-{device}"
        r = _run("merge", quantized_folder, "--adapter", pm_dir, "--out", out, "--requantize", "--eval-data",
                 text_file, "--eval-windows", 2, "--seq-len", 32, "--device", device)
        assert r.exit_code == 0, r.output
        reports[device] = json.loads((out / "merge_report.json").read_text())
        load(out)
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["ppl_merged"] == pytest.approx(cpu["ppl_merged"], rel=1e-4)
    assert gpu["ppl_base_plus_adapter"] == pytest.approx(cpu["ppl_base_plus_adapter"], rel=1e-4)
    assert math.isfinite(gpu["ppl_requantized"])
