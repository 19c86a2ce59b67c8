"""Table of LoRA recovery runs: perplexity before/after and the fraction of the gap closed.

    python -m eval.recovery_table OUT_ROOT FP_PPL --out eval/results/finetune_recovery
"""
import argparse
import json
import math
from pathlib import Path

from quantune.report import markdown_table, write_results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)
    p.add_argument("fp_ppl", type=float, help="perplexity of the full-precision model under the same protocol")
    p.add_argument("--out", default="eval/results/finetune_recovery")
    args = p.parse_args()
    rows = []
    for report in sorted(args.root.glob("*/report.json")):
        r = json.loads(report.read_text())
        if "ppl_before" not in r:  # a quantized folder's report, not a fine-tuning run
            continue
        before, after, fp = r["ppl_before"], r["ppl_after"], args.fp_ppl
        rows.append({
            "run": report.parent.name, "objective": r["train"]["objective"], "init": r["lora"]["init"],
            "steps": r["train"]["steps"], "ppl_before": before, "ppl_after": after,
            "gap_closed_ppl": (before - after) / (before - fp),
            "gap_closed_log_ppl": (math.log(before) - math.log(after)) / (math.log(before) - math.log(fp)),
            "train_seconds": r["train_seconds"], "tokens_per_second": r["tokens_per_second"],
            "device": r["device"], "eval": r["eval"],
        })
    out = Path(args.out)
    table = markdown_table(
        ["run", "objective", "init", "steps", "ppl before", "ppl after", "gap closed (ppl)", "gap closed (log ppl)",
         "train s", "tokens/s"],
        [[r["run"], r["objective"], r["init"], r["steps"], r["ppl_before"], r["ppl_after"], r["gap_closed_ppl"],
          r["gap_closed_log_ppl"], r["train_seconds"], r["tokens_per_second"]] for r in rows])
    md = (f"# LoRA recovery\n\nEvaluation: {rows[0]['eval'] if rows else '-'}; full-precision perplexity "
          f"{args.fp_ppl}.\n\nDevice: {rows[0]['device'] if rows else '-'}\n\n{table}\n")
    write_results(out, {"fp_ppl": args.fp_ppl, "rows": rows}, md)


if __name__ == "__main__":
    main()
