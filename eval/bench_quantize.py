"""Quantization speed: a Llama-2-7B-shaped checkpoint (random bf16, sharded safetensors written by
this script) quantized tensor by tensor with ``quantune quantize --stream``.

    python -m eval.bench_quantize --device cuda --out eval/results/bench_quantize

Reports wall time (shards read, quantized on the device, written), time per layer type,
peak device memory, the largest tensor and the read/write volumes. In the same run, as baselines:

- the same pass with the next tensor read and the last shard written in threads beside the arithmetic
  (``quantune.stream.OVERLAP`` True; off by default until this comparison decides it), against the library's
  default loop, files compared byte for byte;
- the byte floor of this pipeline: the same shards read, the same weights copied to the device, the same
  outputs copied back and written, with no arithmetic in between (the real outputs, loaded beforehand), each
  step timed, so the copy bandwidths it reaches are measured, not assumed; and the device's own copy
  bandwidth (a large device-to-device copy);
- the quantization arithmetic alone, weight by weight already on the device: quantune's method, quantune's
  rtn at the same width (one scale a row) and bitsandbytes NF4 (``quantize_4bit``, blocks of 64), where
  bitsandbytes is installed; on CUDA also kashin with its codes assigned by the GPU kernel
  (``quantune.fit_kernels.NEAREST_KERNEL``, off by default until this decides it), whose codes and
  coefficients must equal the plain fit's (checked per layer in the same run); on the CPU also kashin's fit as
  the GPU runs it without that kernel (binary search for the codes, the refit from the signs), against the CPU's
  own (comparisons, per-code sums; ``quantune.kashin``).

``--layers`` shrinks the model (a 2-layer run checks the set-up in seconds); ``--shape tiny`` makes every
matrix small (the CPU smoke test); ``--shape smollm2-135m`` is SmolLM2-135M's shape (a CPU run in minutes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048)
SHAPES = {"llama2-7b": LLAMA2_7B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}


def write_checkpoint(folder: Path, layers: int, shard_bytes: int = 5 * 2 ** 30, shape: dict = LLAMA2_7B) -> int:
    """Random bf16 weights in the transformers layout, written shard by shard; returns bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)  # k and v rows (grouped-query attention)
    g = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (v, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
                yield p + f"self_attn.{name}.weight", (rows, h)
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_copy_gbps(device: str, nbytes: int = 2 ** 30) -> float | None:
    """The device's copy bandwidth (read + write bytes per second) over a ``nbytes`` device-to-device copy,
    the median of five; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / sorted(times[1:])[2] / 1e9


def io_floor(src: Path, dst: Path, scratch: Path, targets: set, device: str) -> dict:
    """The pipeline's data movement without its arithmetic: each source shard read whole, its quantized
    weights copied to the device, the real output buffers of those layers (put on the device beforehand,
    untimed) copied back, and the output shard written (to ``scratch``). Seconds per step and in all."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from quantune.stream import checkpoint_shards

    scratch.mkdir(parents=True, exist_ok=True)
    steps = {"read": 0.0, "to_device": 0.0, "from_device": 0.0, "write": 0.0}
    moved = {"read": 0, "to_device": 0, "from_device": 0, "write": 0}
    for shard in checkpoint_shards(src):
        outputs = load_file(str(dst / shard.name))
        on_device = {k: v.to(device) for k, v in outputs.items() if k.rsplit(".", 1)[0] in targets}
        _sync(device)
        t0 = time.perf_counter()
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        t1 = time.perf_counter()
        for key, tensor in tensors.items():
            if key.removesuffix(".weight") in targets:
                tensor.to(device)
                moved["to_device"] += tensor.numel() * tensor.element_size()
        _sync(device)
        t2 = time.perf_counter()
        for key, tensor in on_device.items():
            outputs[key] = tensor.cpu()
            moved["from_device"] += tensor.numel() * tensor.element_size()
        t3 = time.perf_counter()
        save_file(outputs, str(scratch / shard.name), metadata={"format": "pt"})
        t4 = time.perf_counter()
        for step, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[step] += seconds
        moved["read"] += sum(t.numel() * t.element_size() for t in tensors.values())
        moved["write"] += sum(t.numel() * t.element_size() for t in outputs.values())
        del tensors, outputs, on_device
    out = {f"{k}_seconds": v for k, v in steps.items()}
    out.update({f"{k}_bytes": v for k, v in moved.items()})
    out.update({f"{k}_GBps": moved[k] / steps[k] / 1e9 if steps[k] else None for k in steps})
    out["seconds"] = sum(steps.values())
    return out


def arithmetic_alone(src: Path, targets: set, cfg, device: str) -> dict:
    """Seconds per layer type of the quantization arithmetic alone, each weight already on the device (bf16, as
    read): quantune's method, quantune's rtn at the same width (one scale a row), bitsandbytes NF4 (blocks of
    64; None where bitsandbytes is missing)."""
    from safetensors import safe_open

    from quantune.config import QuantConfig
    from quantune.methods import get_method
    from quantune.stream import checkpoint_shards

    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 - any import failure means no NF4 baseline here
        bnbf = None
    from quantune import fit_kernels

    rtn = QuantConfig(method="rtn", bits=cfg.bits)
    outputs = {}

    def fit(w, kernel=False):
        saved, fit_kernels.NEAREST_KERNEL = fit_kernels.NEAREST_KERNEL, kernel
        try:
            buffers, _ = get_method(cfg.method).quantize(w.float(), cfg)
        finally:
            fit_kernels.NEAREST_KERNEL = saved
        outputs["kernel" if kernel else "plain"] = buffers

    def gpu_path(w):
        """The fit as the GPU runs it without the kernel: binary search for the codes, the refit from the signs
        (the library's CPU path counts by comparisons and refits from per-code sums; quantune.kashin)."""
        from quantune import kashin

        saved = kashin.REFIT_BY_LEVEL, kashin.NEAREST_BY_COMPARISON
        kashin.REFIT_BY_LEVEL = kashin.NEAREST_BY_COMPARISON = False
        try:
            return get_method(cfg.method).quantize(w.float(), cfg)
        finally:
            kashin.REFIT_BY_LEVEL, kashin.NEAREST_BY_COMPARISON = saved

    contenders = {cfg.method: fit, "rtn": lambda w: get_method("rtn").quantize(w.float(), rtn)}
    if bnbf is not None:
        contenders["nf4"] = lambda w: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    if cfg.method == "kashin" and device.startswith("cuda") and fit_kernels.triton is not None:
        contenders["kashin+nearest-kernel"] = lambda w: fit(w, kernel=True)
    if cfg.method == "kashin" and device == "cpu":
        contenders["kashin, GPU's torch path"] = gpu_path
    equal = True
    by_type: dict = {}
    warm = False
    for shard in checkpoint_shards(src):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = key.removesuffix(".weight")
                if name not in targets:
                    continue
                w = f.get_tensor(key).to(device)
                if not warm:  # kernels compiled, FFT plans made, before any timing
                    for fn in contenders.values():
                        fn(w)
                    warm = True
                entry = by_type.setdefault(name.rsplit(".", 1)[-1], {"shape": list(w.shape), "layers": 0,
                                                                   **{c: 0.0 for c in contenders}})
                entry["layers"] += 1
                for c, fn in contenders.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn(w)
                    _sync(device)
                    entry[c] += time.perf_counter() - t0
                if "kernel" in outputs:  # the kernel's fit: the plain fit's codes and coefficients, bit for bit
                    equal &= all(torch.equal(outputs["plain"][k], outputs["kernel"][k]) for k in outputs["plain"])
                del w
    return {"contenders": list(contenders), "by_layer_type": by_type,
            "totals": {c: sum(e[c] for e in by_type.values()) for c in contenders},
            "nearest_kernel_equal": equal if "kernel" in outputs else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 32 for Llama-2-7B)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", default="kashin")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temp dir)")
    p.add_argument("--out", default="eval/results/bench_quantize")
    p.add_argument("--no-baselines", action="store_true", help="only the quantization pass (no byte floor, no "
                                                                "arithmetic-alone comparison)")
    p.add_argument("--profile", action="store_true", help="only profile one 11008x4096 layer (top device ops)")
    args = p.parse_args()
    if args.profile:
        return profile_layer(args)
    from quantune.config import QuantConfig
    from quantune.stream import quantize_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (slow at the Llama-2-7B shape; --shape tiny)")
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    cfg = QuantConfig(method=args.method, bits=args.bits)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "checkpoint-random", Path(tmp) / "quantized"
        t0 = time.perf_counter()
        read_bytes = write_checkpoint(src, layers, shape=shape,
                                      shard_bytes={"llama2-7b": 5 * 2 ** 30, "smollm2-135m": 2 ** 28}.get(args.shape,
                                                                                                        2 ** 20))
        write_s = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = quantize_checkpoint(src, dst, cfg, device=args.device, dtype=torch.bfloat16, progress=False)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
        written = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
        targets = set(result.layers)
        floor = arithmetic = copy_gbps = overlapped = same = None
        if not args.no_baselines:
            from quantune import stream

            default, stream.OVERLAP = stream.OVERLAP, True
            try:
                t0 = time.perf_counter()
                quantize_checkpoint(src, Path(tmp) / "quantized-overlap", cfg, device=args.device,
                                    dtype=torch.bfloat16, progress=False)
                overlapped = time.perf_counter() - t0
            finally:
                stream.OVERLAP = default
            same = all((dst / f.name).read_bytes() == f.read_bytes()
                       for f in (Path(tmp) / "quantized-overlap").iterdir() if f.suffix == ".safetensors")
            shutil.rmtree(Path(tmp) / "quantized-overlap")
            floor = io_floor(src, dst, Path(tmp) / "io-floor", targets, args.device)
            copy_gbps = device_copy_gbps(args.device)
            arithmetic = arithmetic_alone(src, targets, cfg, args.device)
    by_type = {}
    for name, stats in result.layers.items():
        kind = name.rsplit(".", 1)[-1]
        entry = by_type.setdefault(kind, {"layers": 0, "seconds": 0.0, "shape": stats["shape"]})
        entry["layers"] += 1
        entry["seconds"] += stats["seconds"]
    params = sum(s["shape"][0] * s["shape"][1] for s in result.layers.values())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    largest = max(shape["vocab_size"] * shape["hidden_size"], shape["intermediate_size"] * shape["hidden_size"]) * 2
    summary = {"device": f"{device}, torch {torch.__version__}", "shape": args.shape, "layers": layers,
               "method": args.method, "bits": args.bits, "quantized_weights": params, "wall_seconds": wall,
               "checkpoint_write_seconds": write_s, "read_bytes": read_bytes, "written_bytes": written,
               "peak_device_bytes": peak, "largest_tensor_bytes": largest, "by_layer_type": by_type,
               "mean_rel_error": (sum(s["rel_error"] ** 2 * s["shape"][0] * s["shape"][1]
                                      for s in result.layers.values()) / params) ** 0.5,
               "io_floor": floor, "device_copy_GBps": copy_gbps, "arithmetic_alone": arithmetic,
               "wall_seconds_overlapped": overlapped,
               "overlapped_files_equal": same}
    if floor:
        summary["wall_over_io_floor"] = wall / floor["seconds"]
    if copy_gbps and floor:  # the device's own floor: every quantized weight read once (bf16), its outputs written
        summary["device_floor_seconds"] = (2 * params + floor["from_device_bytes"]) / (copy_gbps * 1e9)  # once
    write_results(Path(args.out), summary, render(summary))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(s: dict) -> str:
    """The Markdown report of a run's summary."""
    wall, gib = s["wall_seconds"], 2 ** 30
    lines = [f"# Quantization speed: {s['shape']} shape ({s['layers']} layers), {s['method']} {s['bits']}-bit, "
             f"streamed\n",
             f"Device: {s['device']}. Wall time **{wall:.1f} s** for {_count(s['quantized_weights'])} quantized "
             f"weights (read {s['read_bytes'] / gib:.1f} GiB, wrote {s['written_bytes'] / gib:.1f} GiB); peak device "
             f"memory {(s['peak_device_bytes'] or 0) / gib:.2f} GiB (largest tensor "
             f"{s['largest_tensor_bytes'] / gib:.2f} GiB). Mean relative weight error {s['mean_rel_error']:.4f}.\n"]
    if s.get("wall_seconds_overlapped"):
        lines.append(f"The same pass with the next tensor read and the last shard written in threads beside the "
                     f"arithmetic (quantune.stream.OVERLAP, off by default until timed): "
                     f"{s['wall_seconds_overlapped']:.1f} s, same run (output files "
                     f"{'byte for byte equal' if s['overlapped_files_equal'] else 'DIFFERENT'}).\n")
    arith = s.get("arithmetic_alone")
    names = arith["contenders"] if arith else []
    headers = ["layer type", "shape", "layers", "in the pass s (sum)"] + [f"{c} alone s" for c in names]
    rows = []
    for kind, e in s["by_layer_type"].items():
        a = arith["by_layer_type"].get(kind, {}) if arith else {}
        rows.append([kind, "x".join(map(str, e["shape"])), e["layers"], e["seconds"]] + [a.get(c) for c in names])
    if arith:
        rows.append(["all", "", sum(e["layers"] for e in s["by_layer_type"].values()),
                     sum(e["seconds"] for e in s["by_layer_type"].values())] + [arith["totals"][c] for c in names])
    lines.append(markdown_table(headers, rows) + "\n")
    lines.append("'in the pass': each layer's time inside the streamed run (its arithmetic, the error check, the "
                 "copies of its buffers); 'alone': the arithmetic only, the weight already on the device, same run"
                 + ("; nf4: bitsandbytes quantize_4bit, blocks of 64" if "nf4" in names else
                    "; bitsandbytes missing here: no NF4 column")
                 + ("; kashin+nearest-kernel: kashin with its codes assigned by quantune.fit_kernels (off by "
                    "default), codes and coefficients " + ("equal to the plain fit's, every layer"
                                                           if arith["nearest_kernel_equal"] else "DIFFERENT")
                    if arith and arith.get("nearest_kernel_equal") is not None else "")
                 + ("; kashin, GPU's torch path: the fit as the GPU runs it without the kernel (binary search, "
                    "the refit from the signs), where the CPU's counts by comparisons and refits from per-code sums"
                    if "kashin, GPU's torch path" in names else "") + ".\n")
    floor = s.get("io_floor")
    if floor:
        steps = [("read the source shards", "read"), ("weights to the device", "to_device"),
                 ("outputs from the device", "from_device"), ("write the outputs", "write")]
        rows = [[label, floor[f"{k}_seconds"], floor[f"{k}_bytes"] / gib, floor[f"{k}_GBps"]] for label, k in steps]
        rows.append(["byte floor of the pipeline (sum)", floor["seconds"], None, None])
        rows.append(["quantization wall time", wall, None, None])
        lines.append("## Against the byte floor\n")
        lines.append(markdown_table(["step (no arithmetic)", "s", "GiB", "GB/s"], rows) + "\n")
        lines.append(f"The quantization pass takes {s['wall_over_io_floor']:.2f}x the time its bytes take to move "
                     f"through the same steps (the real outputs, loaded beforehand).")
        if s.get("device_copy_GBps"):
            lines.append(f" Device copy bandwidth {s['device_copy_GBps']:.0f} GB/s (1 GiB device-to-device copy, read "
                         f"+ write); reading every weight once and writing its codes once on the device alone would "
                         f"take {s['device_floor_seconds'] * 1e3:.1f} ms.")
        lines.append("\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
