"""LoRA fine-tuning speed and memory: quantune vs peft + bitsandbytes QLoRA, one run, one GPU.

    python -m eval.bench_finetune --out eval/results/bench_finetune

A TinyLlama-1.1B-shaped Llama with random weights (hidden 2048, 22 layers, MLP 5632, 32 heads,
4 KV heads, vocab 32000), batch 8 x 1024 random tokens, LoRA r=16 (alpha 32) on every linear
layer of the blocks, AdamW on the adapters, bf16 autocast for every contender. Each case runs
warm-up steps, then timed steps; tokens/s = timed tokens / timed seconds, peak memory =
torch.cuda.max_memory_allocated over the timed steps (model included). Cases:

* ``qlora``: transformers + bitsandbytes NF4 with double quantization, bf16 compute, peft LoRA;
* ``quantune-<method>``: quantune's QuantLinear + peft LoRA (registered custom module), weights
  decoded on every use (forward and backward), as ``quantune finetune`` trains;
* ``quantune-<method>-cached``: the same with the decoded weights cached once in bf16.

each with and without gradient checkpointing (which only acts in train mode).
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quantune.report import markdown_table

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
    from quantune.lora import attach_lora, make_lora_config
    from quantune.quantize import quantize_model

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    start = time.perf_counter()
    quantize_model(model, QuantConfig(method=method, bits=bits, group_size=64 if method == "rtn" else None),
                   progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return attach_lora(model, make_lora_config(r=16, alpha=32)), seconds


_CHECKPOINTING: dict = {}


def run_case(model, checkpointing: bool, batch: int, seq: int, warmup: int, steps: int, cached: bool) -> dict:
    from quantune.qlinear import cached_weights

    if checkpointing and not _CHECKPOINTING.get(id(model)):
        _CHECKPOINTING[id(model)] = True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), device="cuda", generator=g)
    ctx = cached_weights(model, torch.bfloat16) if cached else _null()
    losses = []
    with ctx:
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"tokens_per_second": batch * seq * steps / seconds, "seconds_per_step": seconds / steps,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "checkpointing_active": bool(_CHECKPOINTING.get(id(model))),
            "trainable_parameters": sum(p.numel() for p in params), "final_loss": losses[-1]}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--models", default="qlora,kashin-4", help="qlora and/or <method>-<bits> (quantune)")
    p.add_argument("--out", default="eval/results/bench_finetune")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tinyllama-random"
        build_float(folder)
        for kind in args.models.split(","):  # each model is built once; checkpointing is switched on last
            gc.collect()
            torch.cuda.empty_cache()
            quant_s = None
            if kind == "qlora":
                model, variants = qlora_model(folder), [("qlora", False)]
            else:
                method, bits = kind.split("-")
                model, quant_s = quantune_model(folder, method, int(bits))
                variants = [(f"quantune-{kind}", False), (f"quantune-{kind}-cached", True)]
            for ckpt in (False, True):
                for case, cached in variants:
                    result = run_case(model, ckpt, args.batch, args.seq, args.warmup, args.steps, cached)
                    row = {"case": case, "grad_checkpointing": ckpt, "quantize_s": quant_s, **result}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            del model
    base = {r["grad_checkpointing"]: r["tokens_per_second"] for r in rows if r["case"] == "qlora"}
    for r in rows:
        r["speed_vs_qlora"] = r["tokens_per_second"] / base[r["grad_checkpointing"]] if base else None
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "shape": SHAPE, "batch": args.batch, "seq": args.seq, "warmup_steps": args.warmup,
            "timed_steps": args.steps, "lora": "r=16 alpha=32 all linear layers", "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    table = markdown_table(["case", "grad ckpt", "tokens/s", "x QLoRA", "peak GiB", "s/step", "quantize s"],
                           [[r["case"], r["grad_checkpointing"], r["tokens_per_second"], r["speed_vs_qlora"],
                             r["peak_gpu_gib"], r["seconds_per_step"], r["quantize_s"] or "-"] for r in rows])
    md = (f"# LoRA fine-tuning speed and memory\n\nDevice: {device}. Model: TinyLlama-1.1B shape, random weights; "
          f"batch {args.batch} x {args.seq}; LoRA r=16 on all linear layers; bf16 autocast; "
          f"{args.warmup} warm-up + {args.steps} timed steps per case.\n\n{table}\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
