"""Compare quantune with data-free peers under one protocol, in one run.

    python -m eval.compare --model smollm2-135m --data ../shared/data/austen/persuasion.txt \\
        --methods kashin-4,rtn-4-sym,rtn-4-sym-g128,bnb-nf4-dq,hqq-4-g64 --out eval/results/compare_smollm2

Method names:
* ``kashin-<bits>[-g<group>][-u<u steps>][-t<tied steps>][-had][-rel|-abs]``: quantune kashin (real
  QuantLinear format; ``-t2``: U's two smallest steps tied, see QuantConfig.tied_steps); a fractional
  width (``kashin-3.5``) mixes the two neighbouring widths across layers,
  ranked by relative weight error (the default, ``-rel``) or absolute error (``-abs``) -- see
  quantune.quantize.allocate_bits;
* ``rtn-<bits>-<sym|asym>[-g<group>]``: quantune's round-to-nearest (per-channel without -g);
* ``bnb-nf4``, ``bnb-nf4-dq``, ``bnb-fp4``, ``bnb-fp4-dq``, ``hqq-<bits>-g<group>``: peers through
  their own packages (see eval/peers.py).

Every method quantizes the same layers (every nn.Linear but the output head). All models
are scored on the same windows against the original (perplexity, mean KL, top-1 agreement),
a few models per pass over the windows to bound memory. Writes <out>.json, <out>.md and
<out>.png (perplexity against bits per weight).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from eval.peers import peer_codec
from eval.perplexity import add_protocol_args, evaluate_models, load_protocol
from quantune.config import QuantConfig
from quantune.qlinear import cached_weights
from quantune.quantize import plan_modules, quantize_model
from quantune.report import markdown_table


def quantune_config(name: str) -> QuantConfig | None:
    """QuantConfig for a quantune method name, or None for a peer name."""
    m = re.fullmatch(r"kashin-(\d(?:\.\d+)?)(?:-g(\d+))?(?:-u(\d))?(?:-t(\d))?(-had)?(-rel|-abs)?", name)
    if m:
        width = float(m.group(1))
        return QuantConfig(method="kashin", bits=int(width), target_bits=None if width == int(width) else width,
                           group_size=int(m.group(2)) if m.group(2) else None,
                           u_steps=int(m.group(3)) if m.group(3) else None,
                           tied_steps=int(m.group(4)) if m.group(4) else 0,
                           transform="hadamard" if m.group(5) else "dct")
    m = re.fullmatch(r"rtn-(\d)-(sym|asym)(?:-g(\d+))?", name)
    if m:
        return QuantConfig(method="rtn", bits=int(m.group(1)), symmetric=m.group(2) == "sym",
                           group_size=int(m.group(3)) if m.group(3) else None)
    return None


def quantize_variant(model, name: str):
    """``(quantized copy, bits per weight, seconds)`` for one method name."""
    qmodel = copy.deepcopy(model)
    start = time.perf_counter()
    cfg = quantune_config(name)
    if cfg is not None:
        result = quantize_model(qmodel, cfg, progress=False, sensitivity="abs" if name.endswith("-abs") else "rel")
        n = sum(s["shape"][0] * s["shape"][1] for s in result.layers.values())
        bits = sum(s["bits_per_weight"] * s["shape"][0] * s["shape"][1] for s in result.layers.values())
    else:
        codec = peer_codec(name)
        targets, _ = plan_modules(qmodel, QuantConfig())
        n = bits = 0
        with torch.no_grad():
            for target in targets:
                weight = qmodel.get_submodule(target).weight
                w_hat, stored = codec(weight.detach())
                weight.copy_(w_hat.to(weight.dtype))
                n, bits = n + weight.numel(), bits + stored
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return qmodel, bits / n, time.perf_counter() - start


def plot(rows: list[dict], fp_ppl: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    for family, items in sorted(families.items()):
        items = sorted(items, key=lambda r: r["bpw"])
        ax.scatter([r["bpw"] for r in items], [r["ppl"] for r in items], label=family, s=30)
        for r in items:
            ax.annotate(r["method"], (r["bpw"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(fp_ppl, color="gray", linestyle="--", linewidth=1, label=f"original ({fp_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all overhead counted)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def family(name: str) -> str:
    return name.split("-")[0] if quantune_config(name) is None else f"quantune {name.split('-')[0]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--methods", required=True, help="comma-separated method names (see module docstring)")
    p.add_argument("--models-per-pass", type=int, default=8, help="models evaluated together (memory bound)")
    p.add_argument("--out", default="eval/results/compare", help="output path without extension")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    model, _, windows, protocol = load_protocol(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:  # fail on a bad name before any long work
        if quantune_config(name) is None:
            peer_codec(name)
    rows, fp = [], None
    for start in range(0, len(methods), args.models_per_pass):
        batch = {}
        for name in methods[start:start + args.models_per_pass]:
            qmodel, bpw, seconds = quantize_variant(model, name)
            batch[name] = qmodel
            rows.append({"method": name, "family": family(name), "bpw": bpw, "quantize_s": seconds})
            print(f"{name}: {bpw:.3f} bpw, quantized in {seconds:.1f} s", flush=True)
        with ExitStack() as stack:
            for m in batch.values():
                stack.enter_context(cached_weights(m))
            metrics = evaluate_models({"original": model, **batch}, windows, reference=model)
        fp = metrics["original"]
        for row in rows:
            if row["method"] in metrics:
                row.update(metrics[row["method"]].to_dict())
        del batch
    rows.sort(key=lambda r: (r["bpw"], r["ppl"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
               f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads") + f", torch {torch.__version__}"
    result = {"model": args.model, "protocol": protocol.describe(), "machine": machine,
              "date": time.strftime("%Y-%m-%d"), "original": fp.to_dict(), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = markdown_table(["method", "bits/weight", "perplexity", "KL (nats)", "top-1 agr.", "quantize s"],
                           [["original", 32.0, fp.ppl, 0.0, 1.0, "-"]] +
                           [[r["method"], r["bpw"], r["ppl"], r["kl"], r["top1"], r["quantize_s"]] for r in rows])
    md = f"# {args.model}: data-free comparison\n\nProtocol: {protocol.describe()}\n\nMachine: {machine}\n\n{table}\n"
    out.with_suffix(".md").write_text(md)
    plot(rows, fp.ppl, out.with_suffix(".png"), f"{args.model} on {protocol.text}")
    print(md)


if __name__ == "__main__":
    main()
