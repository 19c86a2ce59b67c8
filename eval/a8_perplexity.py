"""What rounding the quantized layers' inputs to 8 bits would cost a real model (the accuracy side of
eval/probe_a8_gemv.py, whose dp4a GEMV reads such inputs).

The model (SmolLM2-135M by default) is quantized with rtn (one scale a row by default, the library's rtn
default); then perplexity and KL divergence against the float model are measured for the quantized model as
the library computes it (16-bit inputs in the GPU kernels: indistinguishable from float32 here, 3e-5 relative)
and with every quantized layer's input rounded to int8 first, one scale (``max |x| / 127``, rounded half away
from zero: the probe's preparation) per CHUNK columns, for each chunk width asked for. The float model with
its Linear inputs rounded the same way is the control. CPU, float32; writes $OUT/a8_perplexity.{json,md}.

    python -m eval.a8_perplexity --bits 4,2 --chunks 64,256
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from eval.perplexity import add_protocol_args, evaluate_models, load_protocol


def round_input(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``x`` rounded to int8 with one scale per ``chunk`` columns of its last dimension, dequantized."""
    k = x.shape[-1]
    if k % chunk:
        raise ValueError(f"input width {k} is not a multiple of the chunk {chunk}")
    v = x.float().unflatten(-1, (k // chunk, chunk))
    scale = v.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    q = v / scale
    q = torch.where(q >= 0, torch.floor(q + 0.5), torch.ceil(q - 0.5))
    return (q * scale).flatten(-2).to(x.dtype)


def with_rounded_inputs(model: torch.nn.Module, kind: type, chunk: int) -> torch.nn.Module:
    """A copy of ``model`` whose modules of type ``kind`` round their input first (:func:`round_input`)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, kind):
            module.register_forward_pre_hook(lambda _m, args, c=chunk: (round_input(args[0], c), *args[1:]))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--bits", default="4,2")
    p.add_argument("--group", default="row", help="rtn's scale group (columns) or 'row'")
    p.add_argument("--chunks", default="64,192", help="input scale chunks (columns)")
    args = p.parse_args()
    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear
    from quantune.quantize import quantize_model

    model, _, windows, protocol = load_protocol(args)
    model.eval()
    chunks = [int(c) for c in args.chunks.split(",")]
    group = None if args.group == "row" else int(args.group)
    models = {"float": model}
    for c in chunks:
        models[f"float, inputs 8-bit/{c}"] = with_rounded_inputs(model, torch.nn.Linear, c)
    for bits in (int(b) for b in args.bits.split(",")):
        q = copy.deepcopy(model)
        quantize_model(q, QuantConfig(method="rtn", bits=bits, group_size=group), progress=False)
        name = f"rtn-{bits} ({args.group})"
        models[name] = q
        for c in chunks:
            models[f"{name}, inputs 8-bit/{c}"] = with_rounded_inputs(q, QuantLinear, c)
    metrics = evaluate_models(models, windows, reference=model)
    rows = [{"model": name, "ppl": m.ppl, "kl": m.kl, "top1": m.top1} for name, m in metrics.items()]
    out = Path(os.environ.get("OUT", "eval/results"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "protocol": protocol.describe(), "rows": rows}
    (out / "a8_perplexity.json").write_text(json.dumps(report, indent=1))
    lines = ["# 8-bit layer inputs: perplexity cost", "",
             f"Model {args.model}, {protocol.describe()}; CPU, float32. KL and top-1 agreement against the float "
             f"model. 'inputs 8-bit/C': every quantized Linear's input (every Linear's, for the float rows) rounded "
             f"to int8 with one scale per C columns before the layer, as eval/probe_a8_gemv.py's kernel reads it. "
             f"Command: `python -m eval.a8_perplexity --bits {args.bits} --group {args.group} --chunks {args.chunks}`.",
             "", "| model | ppl | KL (nats) | top-1 agreement |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} |" for r in rows]
    (out / "a8_perplexity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
