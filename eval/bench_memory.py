"""Predicted vs measured peak GPU memory of training steps (issue: memory footprint).

    python -m eval.bench_memory --out eval/results/bench_memory

For each model (SmolLM2-135M's architecture from eval/configs/smollm2-135m at 1024 tokens,
gemma-3-270m's from eval/configs/gemma3-270m at 2048 tokens (held out: not looked at while
the estimator was written), and a 1B-scale Llama with random weights built here: hidden
2048, 22 layers, MLP 5632, 32 heads, 4 KV heads, vocab 32000), each mode (full fine-tuning,
LoRA r=16 on a full-precision base, LoRA r=16 on a kashin 4-bit base), with and without
gradient checkpointing, at two batch sizes: the estimate of :mod:`quantune.memory` (computed
here, from the config alone, before the model is loaded) and the measurement: three optimizer
steps of quantune's training step (:func:`quantune.train.train_step`: bf16 autocast, chunked
loss, fused AdamW), peak = ``torch.cuda.max_memory_allocated`` over steps 2 and 3 (the
optimizer states exist from step 1 on). Parameters are float32 (as quantune loads models);
weights are random (the memory of a step does not depend on their values).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def model_config(name: str):
    from transformers import AutoConfig, LlamaConfig

    if name == "llama-1b":
        return LlamaConfig(**LLAMA_1B)
    return AutoConfig.from_pretrained(Path(__file__).parent / "configs" / name)


def build_model(config):
    """Random float32 weights from the config, on the GPU (memory does not depend on the values)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def prepare(model, mode: str):
    from peft import LoraConfig, get_peft_model

    from quantune.config import QuantConfig
    from quantune.lora import attach_lora, make_lora_config
    from quantune.quantize import quantize_model

    model = model.cuda()
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    quantize_model(model, QuantConfig(method="kashin", bits=4), progress=False)
    return attach_lora(model, make_lora_config(r=16, alpha=32))


def measure(model, batch: int, seq: int, ckpt: bool, vocab: int) -> float:
    from quantune.schedules import make_scheduler
    from quantune.train import CausalLMLoss, TrainConfig, make_optimizer, train_step, trainable_parameters

    cfg = TrainConfig(batch_size=batch, seq_len=seq, precision="bf16", grad_checkpointing=ckpt, max_grad_norm=1.0)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = trainable_parameters(model)
    opt = make_optimizer(params, cfg, 1e-5, torch.device("cuda"))
    sched = make_scheduler(opt, 10, "constant", 0, None, 0.0)
    loss_model = CausalLMLoss(model, cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    peak = 0
    for step in range(3):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        train_step(loss_model, [ids], opt, sched, None, params, cfg, torch.device("cuda"))
        torch.cuda.synchronize()
        if step >= 1:
            peak = max(peak, torch.cuda.max_memory_allocated())
    del opt, sched, loss_model, params
    return peak


def main() -> None:
    from quantune.memory import MemorySpec, estimate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,llama-1b,gemma3-270m")
    p.add_argument("--modes", default="full,lora,qlora")
    p.add_argument("--out", default="eval/results/bench_memory")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    batches = {"smollm2-135m": (4, 16), "llama-1b": (2, 8), "gemma3-270m": (2, 4)}  # x seq below
    seqs = {"smollm2-135m": 1024, "llama-1b": 1024, "gemma3-270m": 2048}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    jsonl.write_text("")
    rows = []
    for name in args.models.split(","):
        config = model_config(name)
        seq = seqs[name]
        for mode in args.modes.split(","):
            for ckpt in (False, True):
                for batch in batches[name]:
                    spec = MemorySpec(mode=mode, bits=4, lora_r=16, batch_size=batch, seq_len=seq,
                                      precision="bf16", param_dtype="fp32", grad_checkpointing=ckpt)
                    t0 = time.perf_counter()
                    est = estimate(config, spec, name)
                    est_s = time.perf_counter() - t0
                    gc.collect()
                    torch.cuda.empty_cache()
                    model = prepare(build_model(config), mode)
                    try:
                        measured = measure(model, batch, seq, ckpt, config.vocab_size)
                        error = None
                    except torch.cuda.OutOfMemoryError as exc:
                        measured, error = None, f"out of memory: {exc}"[:200]
                    del model
                    row = {"model": name, "mode": mode, "grad_checkpointing": ckpt, "batch": batch, "seq": seq,
                           "predicted_bytes": est.peak_bytes, "measured_bytes": measured,
                           "error_fraction": (est.peak_bytes - measured) / measured if measured else None,
                           "estimate_seconds": est_s, "peak_phase": est.peak_phase,
                           "lines": {line.name: line.bytes for line in est.lines}, "failure": error}
                    print(json.dumps({k: v for k, v in row.items() if k != "lines"}), flush=True)
                    with jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    rows.append(row)
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    import transformers

    meta = {"device": device, "transformers": transformers.__version__, "rows": rows}
    gib = 2 ** 30
    within = [r for r in rows if r["error_fraction"] is not None]
    worst = max((abs(r["error_fraction"]) for r in within), default=float("nan"))
    table = markdown_table(
        ["model", "mode", "grad ckpt", "batch x seq", "predicted GiB", "measured GiB", "error"],
        [[r["model"], r["mode"], r["grad_checkpointing"], f"{r['batch']} x {r['seq']}", r["predicted_bytes"] / gib,
          (r["measured_bytes"] or 0) / gib, f"{100 * r['error_fraction']:+.1f}%" if r["error_fraction"] is not None
          else r["failure"]] for r in rows])
    md = (f"# Predicted vs measured peak memory\n\nDevice: {device}, transformers {transformers.__version__}. "
          f"Training step: bf16 autocast, float32 parameters, fused AdamW, chunked loss; LoRA r=16 on every linear "
          f"layer of the blocks; qlora: kashin 4-bit base decoded on use. Measured: "
          f"torch.cuda.max_memory_allocated over optimizer steps 2-3. Worst error: {100 * worst:.1f}% "
          f"({sum(abs(r['error_fraction']) <= 0.10 for r in within)}/{len(within)} within 10%).\n\n{table}\n")
    write_results(out, meta, md)


if __name__ == "__main__":
    main()
