"""The jobs behind ``quantune finetune`` and ``quantune merge``: load, train, report."""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eval.perplexity import make_windows, needs_bos
from quantune import __version__
from quantune.config import QuantuneError
from quantune.data import load_text, load_training_texts, pack_documents
from quantune.lora import attach_lora, load_adapter, make_lora_config, merge_into_float, residual_init
from quantune.models import is_quantized_folder, load_model
from quantune.report import human_bytes, markdown_table
from quantune.serialization import atomic_folder, load, write_text_atomic
from quantune.train import TrainConfig, evaluate_perplexity, train, trainable_parameters


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    rslora: bool = False
    target_modules: tuple[str, ...] | None = None
    init: str = "default"  # or "residual" (LoftQ-style SVD of W - dequant(W_q))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantuneError(f"--device {device} asked for, but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise QuantuneError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)") from exc


def source_model(quant_dir: Path) -> str | None:
    """The model a quantized folder was made from (recorded in its report.json)."""
    report = quant_dir / "report.json"
    if report.is_file():
        return json.loads(report.read_text()).get("model")
    return None


def _check_quantized_folder(quant_dir: Path) -> None:
    if not quant_dir.is_dir():
        raise QuantuneError(f"quantized model folder not found: {quant_dir}")
    if not is_quantized_folder(quant_dir):
        raise QuantuneError(f"{quant_dir} is not a quantune-quantized folder (quantize the model first)")


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def run_finetune(quant_dir: str | Path, data: list[str], out_dir: str | Path, cfg: TrainConfig,
                 lora: LoraSettings, *, eval_data: str | None = None, eval_windows: int = 8,
                 eval_seq_len: int | None = None,
                 teacher: str | None = None, device: str = "auto", resume: bool = False, text_field: str = "text",
                 dist=None, log=print) -> dict:
    start = time.perf_counter()
    quant_dir, out_dir = Path(quant_dir), Path(out_dir)
    _check_quantized_folder(quant_dir)
    dev = dist.device if dist else resolve_device(device)
    is_main = dist is None or dist.rank == 0
    if (out_dir / "report.json").exists() and not resume:
        raise QuantuneError(f"output folder {out_dir} already holds a finished run (use another --out)")
    docs, data_name = load_training_texts(data, text_field)
    eval_text = load_text(eval_data) if eval_data else None
    if cfg.objective == "kd" and not teacher:
        teacher = source_model(quant_dir)
        if not teacher:
            raise QuantuneError("distillation needs --teacher MODEL (the original model)")

    model, tokenizer = load(quant_dir, device=dev)
    limit = _max_positions(model)
    if limit is not None and cfg.seq_len > limit:
        raise QuantuneError(f"sequence length {cfg.seq_len} exceeds the model's {limit} positions")
    bos = needs_bos(model, tokenizer)
    sequences = pack_documents(tokenizer, docs, cfg.seq_len, bos=bos)
    windows = protocol = None
    if eval_text is not None:
        eval_len = eval_seq_len or cfg.seq_len
        if limit is not None and eval_len > limit:
            raise QuantuneError(f"evaluation sequence length {eval_len} exceeds the model's {limit} positions")
        windows, protocol = make_windows(tokenizer, eval_text[0], eval_len, eval_windows, bos=bos,
                                         text_name=eval_text[1])

    original = None
    if cfg.objective == "kd" or lora.init == "residual":
        spec = teacher or source_model(quant_dir)
        if not spec:
            raise QuantuneError("residual init needs the original model: pass --teacher MODEL")
        original, _, _ = load_model(spec)
        original.to(dev).eval()
        for p in original.parameters():
            p.requires_grad_(False)

    peft_model = attach_lora(model, make_lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules,
                                                     lora.rslora, lora.init))
    init_stats = residual_init(peft_model, original) if lora.init == "residual" else None
    if cfg.objective != "kd":
        original = None  # only needed for the init
    n_trainable = sum(p.numel() for p in trainable_parameters(peft_model))
    n_total = sum(p.numel() for p in peft_model.parameters()) + sum(b.numel() for b in peft_model.buffers())

    prediction = _predict_memory(peft_model, cfg, lora, dist.world if dist else 1)
    if is_main and "peak_bytes" in prediction:
        log(f"predicted peak GPU memory of a training step: {human_bytes(prediction['peak_bytes'])} "
            "(quantune memory; the measurement is in the report)")
    memory_probe = None
    if cfg.grad_checkpointing and dev.type == "cuda" and not resume:
        memory_probe = _checkpointing_memory_probe(peft_model, sequences, cfg, dev, original)

    out_dir.mkdir(parents=True, exist_ok=True)
    history = train(peft_model, sequences, cfg, out_dir=out_dir, device=dev, eval_windows=windows,
                    teacher=original, resume=resume, dist=dist, log=log if is_main else (lambda *_: None))
    if memory_probe is not None:
        memory_probe["peak_gpu_bytes_with_checkpointing"] = history.get("peak_gpu_bytes")
    report = {
        "quantune_version": __version__, "base": str(quant_dir), "source_model": source_model(quant_dir),
        "data": data_name, "train_sequences": len(sequences), "train_tokens": int(sequences.numel()),
        "eval": protocol.describe() if protocol else None,
        "ppl_before": history["evals"][0]["ppl"] if history["evals"] else None,
        "ppl_after": history["evals"][-1]["ppl"] if history["evals"] else None,
        "trainable_parameters": n_trainable, "total_parameters_and_buffers": n_total,
        "lora": asdict(lora), "train": asdict(cfg), "teacher": teacher if cfg.objective == "kd" else None,
        "device": _device_name(dev), "world_size": dist.world if dist else 1,
        "tokens_per_second": history.get("tokens_per_second"), "train_seconds": history.get("train_seconds"),
        "peak_memory": {k: v for k, v in history.items() if k.startswith("peak_")},
        "checkpointing_memory": memory_probe, "residual_init": init_stats,
        "memory_prediction": {**prediction, "measured_training_peak_gpu_bytes": max(
            (s["peak_gpu_bytes"] for s in history["steps"][1:] if "peak_gpu_bytes" in s), default=None)},
        "history": {"steps": history["steps"], "evals": history["evals"]},
        "total_seconds": time.perf_counter() - start,
    }
    if is_main:
        _write_adapter_and_report(peft_model, out_dir, report)
    return report


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def _predict_memory(peft_model, cfg: TrainConfig, lora: LoraSettings, world: int) -> dict:
    """quantune memory's prediction for this run (for the GPU; a failure is recorded, not raised)."""
    from quantune.memory import MemorySpec, estimate

    try:
        config = peft_model.get_base_model().config
        qc = config.quantization_config if isinstance(config.quantization_config, dict) else {}
        dtype = next(p for p in peft_model.parameters() if p.is_floating_point() and not p.requires_grad).dtype
        spec = MemorySpec(mode="qlora", bits=qc.get("target_bits") or qc.get("bits", 4),
                          method=qc.get("method", "kashin"), group_size=qc.get("group_size"), lora_r=lora.r,
                          target_modules=lora.target_modules, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                          precision=cfg.precision, param_dtype={torch.float32: "fp32", torch.bfloat16: "bf16",
                                                                torch.float16: "fp16"}[dtype],
                          grad_checkpointing=cfg.grad_checkpointing,
                          optimizer="adamw8bit" if cfg.optimizer == "adamw8bit" else "adamw",
                          cache_weights=cfg.cache_weights, teacher=cfg.objective == "kd", gpus=world)
        est = estimate(config, spec)
        return {"peak_bytes": est.peak_bytes, "phase": est.peak_phase, "compiled": cfg.compile,
                "lines": {line.name: line.bytes for line in est.lines}}
    except Exception as exc:  # the estimate is advice; training goes on without it
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def _checkpointing_memory_probe(model, sequences, cfg, dev, teacher) -> dict:
    """Peak GPU memory of one micro-batch forward + backward without gradient checkpointing
    (the training run then measures it with checkpointing)."""
    from quantune.train import CausalLMLoss, autocast_context

    batch = sequences[: cfg.batch_size].to(dev)
    model.train()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with autocast_context(cfg.precision, dev):
        loss, _ = CausalLMLoss(model, cfg, teacher, chunked=cfg.chunked_loss)(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(dev)
    return {"peak_gpu_bytes_without_checkpointing_one_micro_batch": torch.cuda.max_memory_allocated(dev)}


def _write_adapter_and_report(peft_model, out_dir: Path, report: dict) -> None:
    """Adapter files first (each moved into place), report.json last: a folder with a
    report.json is a finished run."""
    tmp = out_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
    try:
        _plot_curves(report, out_dir / "curves.png")
        report["plot"] = "curves.png"
    except Exception as exc:  # a plot is a convenience; the numbers are in the report
        report["plot_error"] = str(exc)
    write_text_atomic(out_dir / "report.md", finetune_markdown(report))
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))


def _plot_curves(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["history"]["steps"]
    evals = report["history"]["evals"]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 6, 4))
    axes = axes if evals else [axes]
    axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], linewidth=1)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel(f"training loss ({report['train']['objective']})")
    axes[0].set_title("training loss")
    if evals:
        axes[1].plot([e["step"] for e in evals], [e["ppl"] for e in evals], marker="o")
        axes[1].set_xlabel("optimizer step")
        axes[1].set_ylabel("perplexity")
        axes[1].set_title(f"eval: {report['eval']}"[:60], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune_markdown(report: dict) -> str:
    t, lo = report["train"], report["lora"]
    mem = report["peak_memory"]
    rows = [
        ["base (quantized)", report["base"]], ["original model", report["source_model"]],
        ["training data", f"{report['data']} ({report['train_sequences']} sequences of {t['seq_len']} tokens)"],
        ["evaluation", report["eval"] or "-"],
        ["perplexity before -> after", f"{_fmt(report['ppl_before'])} -> {_fmt(report['ppl_after'])}"],
        ["trainable parameters", f"{report['trainable_parameters']:,}"],
        ["tokens/s (training, steady state)", _fmt(report["tokens_per_second"])],
        ["peak memory", ", ".join(f"{k}: {human_bytes(v)}" for k, v in mem.items()) or "-"],
        ["device", f"{report['device']} x {report['world_size']} process(es)"],
        ["train time (s)", _fmt(report["train_seconds"])],
    ]
    pred = report.get("memory_prediction") or {}
    if pred.get("peak_bytes"):
        measured = pred.get("measured_training_peak_gpu_bytes")
        rows.append(["peak GPU memory of a training step: predicted / measured",
                     f"{human_bytes(pred['peak_bytes'])} / " + (human_bytes(measured) if measured else "- (not on a GPU)")
                     + (f" ({100 * (pred['peak_bytes'] - measured) / measured:+.1f}%)" if measured else "")
                     + (" (compiled layers need less than predicted)" if pred.get("compiled") else "")])
    probe = report.get("checkpointing_memory")
    if probe:
        rows.append(["gradient checkpointing memory", "one micro-batch without: "
                     f"{human_bytes(probe['peak_gpu_bytes_without_checkpointing_one_micro_batch'])}; "
                     f"training with: {human_bytes(probe.get('peak_gpu_bytes_with_checkpointing') or 0)}"])
    out = ["# quantune finetune report", "", markdown_table(["quantity", "value"], rows), "",
           "## Hyperparameters", "",
           markdown_table(["setting", "value"], [[f"lora.{k}", str(v)] for k, v in lo.items()] +
                          [[k, str(v)] for k, v in t.items() if k != "extra"] +
                          [["teacher", str(report.get("teacher"))]])]
    evals = report["history"]["evals"]
    if evals:
        out += ["", "## Evaluations", "", markdown_table(["step", "perplexity"], [[e["step"], e["ppl"]] for e in evals])]
    if report.get("plot"):
        out += ["", f"![loss and perplexity curves]({report['plot']})"]
    return "\n".join(out) + "\n"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:,.3f}" if isinstance(x, float) else str(x)


def run_merge(quant_dir: str | Path, adapter: str | Path, out_dir: str | Path, *, dtype=torch.float32,
              requantize: bool = False, eval_data: str | None = None, eval_windows: int = 4, seq_len: int = 512,
              overwrite: bool = False, device: str = "cpu") -> dict:
    """Fold the adapter into a float copy (dequantized base + B A) and save it as a standard
    transformers folder; optionally re-quantize the merged weights with the base's settings."""
    from quantune.quantize import quantize_model
    from quantune.serialization import read_quant_config, save_model_files

    quant_dir, out_dir = Path(quant_dir), Path(out_dir)
    _check_quantized_folder(quant_dir)
    if out_dir.exists() and not overwrite:
        raise QuantuneError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    dev = resolve_device(device)
    model, tokenizer = load(quant_dir, device=dev)
    peft_model = load_adapter(model, adapter)
    windows = None
    if eval_data:
        text, name = load_text(eval_data)
        windows, protocol = make_windows(tokenizer, text, seq_len, eval_windows, bos=needs_bos(model, tokenizer),
                                         text_name=name)
    result = {"base": str(quant_dir), "adapter": str(adapter), "out": str(out_dir)}
    if windows is not None:
        result["protocol"] = protocol.describe()
        result["ppl_base_plus_adapter"] = evaluate_perplexity(peft_model, windows, "fp32", dev)
    merged = merge_into_float(peft_model, dtype=dtype)
    if windows is not None:
        result["ppl_merged"] = evaluate_perplexity(merged, windows, "fp32", dev)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        if requantize:
            qcfg = read_quant_config(quant_dir)
            requant = copy.deepcopy(merged).float()
            qres = quantize_model(requant, qcfg, progress=False)
            save_model_files(requant, tokenizer, qres.config, tmp)
            result["requantized"] = {"config": qres.config.to_dict(),
                                     "bits_per_weight": sum(L["bits_per_weight"] * L["shape"][0] * L["shape"][1]
                                                            for L in qres.layers.values()) /
                                     sum(L["shape"][0] * L["shape"][1] for L in qres.layers.values())}
            if windows is not None:
                result["ppl_requantized"] = evaluate_perplexity(requant, windows, "fp32", dev)
        else:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "merge_report.json").write_text(json.dumps(result, indent=2))
    return result
