"""Measure quantization variants on one model and text, appending every result to a log.

    python -m eval.explore_kashin --variants '[{"method":"rtn","bits":4}, {"bits":4,"u_steps":2}]'

Each variant is a set of QuantConfig fields. All variants are evaluated in one pass over
the same windows against the original model (KL, top-1 agreement), and each result is
appended as one JSON line to eval/results/variants.jsonl, so no variant is measured twice.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from eval.perplexity import add_protocol_args, evaluate_models, load_protocol
from quantune.config import QuantConfig
from quantune.qlinear import cached_weights
from quantune.quantize import quantize_model

LOG = Path(__file__).parent / "results" / "variants.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--variants", required=True, help="JSON list of QuantConfig field dicts")
    p.add_argument("--note", default="")
    p.add_argument("--log", default=str(LOG), help="JSON-lines file the results are appended to")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    model, _, windows, protocol = load_protocol(args)
    model_name = args.model
    models, meta = {}, {}
    for i, fields in enumerate(json.loads(args.variants)):
        cfg = QuantConfig(**fields)
        qmodel = copy.deepcopy(model)
        start = time.perf_counter()
        result = quantize_model(qmodel, cfg, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        n = sum(s["shape"][0] * s["shape"][1] for s in result.layers.values())
        bpw = sum(s["bits_per_weight"] * s["shape"][0] * s["shape"][1] for s in result.layers.values()) / n
        err = sum(s["rel_error"] ** 2 * s["shape"][0] * s["shape"][1] for s in result.layers.values()) / n
        key = f"v{i}"
        models[key] = qmodel
        meta[key] = {"config": fields, "bpw": bpw, "quantize_s": seconds, "mean_sq_rel_error": err,
                     "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
        print(f"{key} {fields}: bpw {bpw:.3f}, {seconds:.1f}s, mean rel err^2 {err:.4f}", flush=True)
    with ExitStack() as stack:
        for m in models.values():
            stack.enter_context(cached_weights(m))
        metrics = evaluate_models({"fp": model, **models}, windows, reference=model)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        for key, m in meta.items():
            row = {"model": model_name, "protocol": protocol.describe(), **m, **metrics[key].to_dict(),
                   "fp_ppl": metrics["fp"].ppl, "note": args.note, "date": time.strftime("%Y-%m-%d %H:%M")}
            f.write(json.dumps(row) + "\n")
            print(f"{key} {m['config']}: bpw {m['bpw']:.3f} ppl {metrics[key].ppl:.2f} KL {metrics[key].kl:.4f}")
    print(f"fp ppl {metrics['fp'].ppl:.3f}")


if __name__ == "__main__":
    main()
