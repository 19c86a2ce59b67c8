"""LoRA fine-tuning speed and memory: quantune vs peft + bitsandbytes QLoRA, one run, one GPU.

    python -m eval.bench_finetune --out eval/results/bench_finetune

A TinyLlama-1.1B-shaped Llama with random weights (hidden 2048, 22 layers, MLP 5632, 32 heads,
4 KV heads, vocab 32000), batch 8 x 1024 random tokens, LoRA r=16 (alpha 32, no dropout) on
every linear layer of the blocks, AdamW (fused) on the adapters, bf16 autocast, no gradient
clipping, for every contender. Each case runs warm-up steps, then timed steps; tokens/s =
timed tokens / timed seconds; peak memory = the largest torch.cuda.max_memory_allocated of
the timed steps (model included). Cases:

* ``qlora``: transformers + bitsandbytes NF4 with double quantization, bf16 compute, peft
  LoRA, the usual loop (model forward to full logits, cross-entropy, backward, step);
* ``quantune-<method>-<mode>``: ``quantune.train.train`` -- the loop ``quantune finetune``
  runs -- on a model quantized by quantune with peft LoRA on its QuantLinear modules:
  ``decode``: weights decoded on every use (forward and backward; the least memory);
  ``cached``: the decoded weights cached once in bf16 (``--cache-weights``);
  ``cached-compiled``: the same with each decoder layer compiled (``--compile``);
  quantune's loop computes the LM head and loss in blocks of tokens (no full logits);
* ``bf16-lora-compiled``: the same quantune loop on the unquantized bf16 model (reference:
  what the quantized weights cost);
* ``qlora-compiled``: the QLoRA model under the same quantune loop with compiled layers
  (the fairest like-for-like, if bitsandbytes compiles here).

each with and without gradient checkpointing (which only acts in train mode). Each row is
printed and appended to ``<out>.jsonl`` as it finishes, so a cut-short run keeps its rows.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quantune.report import markdown_table, write_results

SHAPE = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def build_float(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return config


def qlora_model(folder: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def quantune_model(folder: Path, method: str, bits: int):
    from transformers import AutoModelForCausalLM

    from quantune.config import QuantConfig
    from quantune.quantize import quantize_model

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE)
    start = time.perf_counter()
    quantize_model(model, QuantConfig(method=method, bits=bits, group_size=64 if method == "rtn" else None),
                   progress=False)
    _sync()
    return model, time.perf_counter() - start


def bf16_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE)


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, quantized: bool):
    from peft import LoraConfig, get_peft_model

    from quantune.lora import attach_lora, make_lora_config

    if quantized:
        return attach_lora(model, make_lora_config(r=16, alpha=32))
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LINEARS, task_type="CAUSAL_LM"))


def hf_loop_case(model, checkpointing: bool, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """The usual peft training loop: full logits, float cross-entropy."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    data = random_tokens(batch * (warmup + steps), seq)
    times, peaks, losses = [], [], []
    for i in range(warmup + steps):
        ids = data[i * batch:(i + 1) * batch].to(DEVICE)
        _sync()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        _sync()
        times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated())
    return summarize(times[warmup:], peaks[warmup:], batch * (seq - 1), losses[-1], params)


def quantune_loop_case(model, checkpointing: bool, cached: bool, compiled: bool, batch: int, seq: int,
                       warmup: int, steps: int, workdir: Path) -> dict:
    """quantune's own training loop (quantune.train.train), exactly as ``quantune finetune`` calls it."""
    from quantune.train import TrainConfig, train, trainable_parameters

    cfg = TrainConfig(steps=warmup + steps, batch_size=batch, seq_len=seq, lr=1e-4, schedule="constant",
                      precision="bf16", max_grad_norm=None, grad_checkpointing=checkpointing, cache_weights=cached,
                      compile=compiled, log_every=0)
    hist = train(model, random_tokens(batch * (warmup + steps), seq), cfg, out_dir=workdir, device=DEVICE,
                 log=lambda *_: None)
    timed = hist["steps"][warmup:]
    return summarize([s["seconds"] for s in timed], [s.get("peak_gpu_bytes", 0) for s in timed], batch * (seq - 1),
                     timed[-1]["loss"], trainable_parameters(model))


def summarize(times, peaks, tokens_per_step, final_loss, params) -> dict:
    return {"tokens_per_second": tokens_per_step * len(times) / sum(times), "seconds_per_step": sum(times) / len(times),
            "peak_gpu_gib": max(peaks) / 2 ** 30, "trainable_parameters": sum(p.numel() for p in params),
            "final_loss": final_loss}


def random_tokens(n: int, seq: int) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(0))


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


DEVICE = torch.device("cuda")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cases", default="qlora,kashin-4-decode,kashin-4-cached,kashin-4-cached-compiled,"
                                      "bf16-lora-compiled,qlora-compiled",
                   help="comma-separated cases (see the module docstring)")
    p.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    p.add_argument("--out", default="eval/results/bench_finetune")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU: checks the script runs")
    args = p.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = torch.device("cpu")
        SHAPE.update(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    jsonl.write_text("")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tinyllama-random"
        build_float(folder)
        quantized = {}
        for case in args.cases.split(","):
            for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
                gc.collect()
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
                quant_s = None
                try:
                    if case == "qlora":
                        result = hf_loop_case(qlora_model(folder), ckpt, args.batch, args.seq, args.warmup, args.steps)
                    else:
                        compiled = case.endswith("-compiled")
                        if case.startswith("qlora"):
                            model = qlora_model(folder)
                        elif case.startswith("bf16"):
                            model = with_lora(bf16_model(folder), quantized=False)
                        else:
                            method, bits, mode = case.split("-", 2)
                            if (method, bits) not in quantized:  # quantize once; each case trains a copy
                                model, quant_s = quantune_model(folder, method, int(bits))
                                quantized[method, bits] = (model.cpu(), quant_s)
                            base, quant_s = quantized[method, bits]
                            model = with_lora(copy.deepcopy(base).to(DEVICE), quantized=True)
                        result = quantune_loop_case(model, ckpt, "cached" in case, compiled, args.batch, args.seq,
                                                    args.warmup, args.steps, Path(tmp) / f"{case}-{ckpt}")
                except Exception as exc:  # a contender that cannot run here is reported, not fatal
                    result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                row = {"case": case, "grad_checkpointing": ckpt, "quantize_s": quant_s, **result}
                print(json.dumps(row), flush=True)
                with jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                model = None
    base = {r["grad_checkpointing"]: r["tokens_per_second"] for r in rows if r["case"] == "qlora" and "error" not in r}
    base_mem = {r["grad_checkpointing"]: r["peak_gpu_gib"] for r in rows if r["case"] == "qlora" and "error" not in r}
    for r in rows:
        ok = "error" not in r and r["grad_checkpointing"] in base
        r["speed_vs_qlora"] = r["tokens_per_second"] / base[r["grad_checkpointing"]] if ok else None
        r["memory_vs_qlora"] = r["peak_gpu_gib"] / base_mem[r["grad_checkpointing"]] if ok else None
    device = (f"{torch.cuda.get_device_name()}" if DEVICE.type == "cuda" else "CPU") + f", torch {torch.__version__}"
    meta = {"device": device, "shape": SHAPE, "batch": args.batch, "seq": args.seq, "warmup_steps": args.warmup,
            "timed_steps": args.steps, "lora": "r=16 alpha=32 dropout=0 all linear layers of the blocks",
            "rows": rows}
    table = markdown_table(
        ["case", "grad ckpt", "tokens/s", "x QLoRA", "peak GiB", "memory x QLoRA", "s/step", "quantize s"],
        [[r["case"], r["grad_checkpointing"], r.get("tokens_per_second", r.get("error")), r["speed_vs_qlora"],
          r.get("peak_gpu_gib"), r["memory_vs_qlora"], r.get("seconds_per_step"), r["quantize_s"] or "-"]
         for r in rows])
    md = (f"# LoRA fine-tuning speed and memory\n\nDevice: {device}. Model: TinyLlama-1.1B shape, random weights; "
          f"batch {args.batch} x {args.seq}; LoRA r=16 on all linear layers of the blocks; bf16 autocast; "
          f"{args.warmup} warm-up + {args.steps} timed steps per case; tokens/s counts predicted tokens "
          f"(batch x (seq - 1)). Cases are described in eval/bench_finetune.py.\n\n{table}\n")
    write_results(out, meta, md)


if __name__ == "__main__":
    main()
