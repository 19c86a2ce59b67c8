"""The spine's acceptance table: quantize a model several ways, reload each folder, and
evaluate all of them against the original in one pass over the same windows.

    python -m eval.spine_table --out-json eval/results/spine_smollm2.json

Quantize time is measured on this machine (the quantize step alone, no evaluation), the
size is that of the written model.safetensors, and every quantized model is evaluated
after being loaded back from its folder with quantune.load.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from eval.perplexity import add_protocol_args, evaluate_models, load_protocol
from quantune import load
from quantune.config import QuantConfig
from quantune.pipeline import run_quantize
from quantune.qlinear import cached_weights
from quantune.report import human_bytes, markdown_table

DEFAULT_RUNS = [
    {"method": "kashin", "bits": 4},
    {"method": "rtn", "bits": 4},
    {"method": "rtn", "bits": 4, "group_size": 128},
    {"method": "kashin", "bits": 3},
    {"method": "rtn", "bits": 3},
    {"method": "rtn", "bits": 3, "group_size": 128},
    {"method": "kashin", "bits": 2},
    {"method": "rtn", "bits": 2},
    {"method": "rtn", "bits": 2, "group_size": 128},
]


def label(fields: dict) -> str:
    cfg = QuantConfig(**fields)
    if cfg.method == "rtn":
        grid = "sym" if cfg.symmetric else "asym"
        return f"rtn {grid} {cfg.bits}-bit " + (f"g{cfg.group_size}" if cfg.group_size else "per-channel")
    extra = f", g{cfg.group_size}" if cfg.group_size else ""
    return f"kashin {cfg.bits}-bit ({cfg.ku}u+{cfg.kv}v steps, {cfg.transform}{extra})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--runs", default=None, help="JSON list of QuantConfig field dicts (default: the spine's table)")
    p.add_argument("--work-dir", default="out/spine")
    p.add_argument("--out-json", default="eval/results/spine_smollm2.json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    runs = json.loads(args.runs) if args.runs else DEFAULT_RUNS

    rows = []
    for fields in runs:
        folder = Path(args.work_dir) / label(fields).replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        report = run_quantize(args.model, QuantConfig(**fields), folder, eval_data=None, overwrite=True)
        rows.append({"label": label(fields), "config": fields, "folder": str(folder), **report["summary"]})
        print(f"{rows[-1]['label']}: {report['summary']['bpw_quantized_layers']:.3f} bpw, "
              f"{report['summary']['quantize_seconds']:.1f} s", flush=True)

    model, _, windows, protocol = load_protocol(args)
    models = {row["label"]: load(row["folder"], device=args.device)[0] for row in rows}
    with ExitStack() as stack:
        for m in models.values():
            stack.enter_context(cached_weights(m))
        metrics = evaluate_models({"original (fp32)": model, **models}, windows, reference=model)
    for row in rows:
        row.update(metrics[row["label"]].to_dict())
    fp = metrics["original (fp32)"]
    result = {
        "model": args.model, "protocol": protocol.describe(), "machine": f"{platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
        "original": fp.to_dict(), "rows": rows,
    }
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown_table(
        ["configuration", "bits/weight", "perplexity", "KL (nats)", "top-1 agr.", "quantize s", "model.safetensors"],
        [["original (fp32)", 32.0, fp.ppl, 0.0, 1.0, "-", "-"]]
        + [[r["label"], r["bpw_quantized_layers"], r["ppl"], r["kl"], r["top1"], r["quantize_seconds"],
            human_bytes(r["file_bytes"])] for r in rows])
    md = f"# {args.model}: quantune quantize\n\nProtocol: {protocol.describe()}\n\nMachine: {result['machine']}\n\n{table}\n"
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
