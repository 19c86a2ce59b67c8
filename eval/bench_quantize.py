"""Quantization speed: a Llama-2-7B-shaped checkpoint (random bf16, sharded safetensors written by
this script) quantized tensor by tensor with ``quantune quantize --stream``.

    python -m eval.bench_quantize --device cuda --out eval/results/bench_quantize

Reports wall time (shards read, quantized on the device, written), time per layer type,
peak device memory, the largest tensor and the read/write volumes. ``--layers`` shrinks the
model (a 2-layer run checks the set-up in seconds).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def write_checkpoint(folder: Path, layers: int, shard_bytes: int = 5 * 2 ** 30) -> int:
    """Random bf16 weights in the transformers layout, written shard by shard; returns bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}, tie_word_embeddings=False)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (v, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{name}.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (f, h)
            yield p + "mlp.up_proj.weight", (f, h)
            yield p + "mlp.down_proj.weight", (h, f)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (v, h)

    weight_map, shard, size, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, index = {}, 0, index + 1

    for name, shape in tensors():
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def profile_layer(args) -> None:
    """torch.profiler over one MLP-sized layer: where the quantization time goes on the device."""
    from torch.profiler import ProfilerActivity, profile

    from quantune.config import QuantConfig
    from quantune.methods import get_method

    cfg = QuantConfig(method=args.method, bits=args.bits)
    w = torch.randn(11008, 4096, device=args.device) * 0.02
    get_method(args.method).quantize(w, cfg)  # warm-up (FFT plans, kernels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    get_method(args.method).quantize(w, cfg)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        get_method(args.method).quantize(w, cfg)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    out = Path(args.out + "_profile.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"one 11008x4096 layer, {args.method} {args.bits}-bit: {wall:.3f} s\n{table}\n")
    print(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", default="kashin")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temp dir)")
    p.add_argument("--out", default="eval/results/bench_quantize")
    p.add_argument("--profile", action="store_true", help="only profile one 11008x4096 layer (top device ops)")
    args = p.parse_args()
    if args.profile:
        return profile_layer(args)
    from quantune.config import QuantConfig
    from quantune.stream import quantize_checkpoint

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "llama2-7b-random", Path(tmp) / "quantized"
        t0 = time.perf_counter()
        read_bytes = write_checkpoint(src, args.layers)
        write_s = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = quantize_checkpoint(src, dst, QuantConfig(method=args.method, bits=args.bits), device=args.device,
                                     dtype=torch.bfloat16, progress=False)
        wall = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    by_type = {}
    for name, stats in result.layers.items():
        kind = name.rsplit(".", 1)[-1]
        entry = by_type.setdefault(kind, {"layers": 0, "seconds": 0.0, "shape": stats["shape"]})
        entry["layers"] += 1
        entry["seconds"] += stats["seconds"]
    params = sum(s["shape"][0] * s["shape"][1] for s in result.layers.values())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    summary = {"device": f"{device}, torch {torch.__version__}", "layers": args.layers, "method": args.method,
               "bits": args.bits, "quantized_weights": params, "wall_seconds": wall,
               "checkpoint_write_seconds": write_s, "read_bytes": read_bytes, "written_bytes": written,
               "peak_device_bytes": peak, "largest_tensor_bytes": 32000 * 4096 * 2, "by_layer_type": by_type,
               "mean_rel_error": (sum(s["rel_error"] ** 2 * s["shape"][0] * s["shape"][1]
                                      for s in result.layers.values()) / params) ** 0.5}
    out = Path(args.out)
    table = markdown_table(["layer type", "shape", "layers", "quantize s (sum)"],
                           [[k, "x".join(map(str, v["shape"])), v["layers"], v["seconds"]] for k, v in by_type.items()])
    md = (f"# Quantization speed: Llama-2-7B shape ({args.layers} layers), {args.method} {args.bits}-bit, streamed\n\n"
          f"Device: {summary['device']}. Wall time {wall:.1f} s for {params / 1e9:.2f} B quantized weights "
          f"(read {read_bytes / 2**30:.1f} GiB, wrote {written / 2**30:.1f} GiB); peak device memory "
          f"{(peak or 0) / 2**30:.2f} GiB.\n\n{table}\n")
    write_results(out, summary, md)


if __name__ == "__main__":
    main()
