"""Data parallel vs one GPU: loss curves, their difference against the seed-to-seed noise, throughput.

    python -m eval.ddp_compare REF=DIR [NAME=DIR ...] --noise DIR --out eval/results/finetune_ddp

Each DIR is a ``quantune finetune`` output folder (report.json). REF is the one-GPU run; every
other run is compared step by step with it (mean and largest absolute loss difference, the
final-window mean loss, perplexity after, tokens/s and the ratio to REF). ``--noise`` is the
same one-GPU run with another seed (other data order and adapter initialisation): its difference
from REF is the scale that "within noise" is measured against.
"""
import argparse
import json
from pathlib import Path

from quantune.report import markdown_table, write_results


def load(spec: str) -> tuple[str, dict]:
    name, _, path = spec.partition("=")
    report = json.loads((Path(path) / "report.json").read_text())
    return name, report


def losses(report: dict) -> list[float]:
    return [s["loss"] for s in report["history"]["steps"]]


def diff(a: list[float], b: list[float], tail: int) -> dict:
    n = min(len(a), len(b))
    d = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    return {"steps": n, "mean_abs_diff": sum(d) / n, "max_abs_diff": max(d),
            "final_mean_loss": sum(b[n - tail:n]) / tail}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="NAME=DIR, the first one the reference (one GPU)")
    p.add_argument("--noise", required=True, help="the reference run with another seed")
    p.add_argument("--tail", type=int, default=10, help="steps averaged for the final loss")
    p.add_argument("--out", default="eval/results/finetune_ddp")
    args = p.parse_args()
    (ref_name, ref), *others = [load(s) for s in args.runs]
    noise_name, noise = load("noise=" + args.noise)
    ref_loss = losses(ref)
    rows = []
    for name, r in [(ref_name, ref), ("1 GPU, other seed (noise)", noise), *others]:
        tr = r["train"]
        rows.append({
            "run": name, "world_size": r["world_size"], "per_gpu_batch": tr["batch_size"],
            "global_batch": tr["batch_size"] * tr.get("grad_accum", 1) * r["world_size"],
            "seed": tr.get("seed"), **diff(ref_loss, losses(r), args.tail), "ppl_after": r["ppl_after"],
            "tokens_per_second": r["tokens_per_second"],
            "throughput_ratio": r["tokens_per_second"] / ref["tokens_per_second"],
            "peak_gpu_bytes": r["peak_memory"].get("peak_gpu_bytes"), "device": r["device"]})
    out = Path(args.out)
    table = markdown_table(
        ["run", "GPUs", "batch/GPU", "global batch", "seed", "mean abs loss diff vs ref", "max abs loss diff",
         f"mean loss, last {args.tail}", "ppl after", "tokens/s", "vs 1 GPU", "peak GiB/GPU"],
        [[r["run"], r["world_size"], r["per_gpu_batch"], r["global_batch"], r["seed"], r["mean_abs_diff"],
          r["max_abs_diff"], r["final_mean_loss"], r["ppl_after"], r["tokens_per_second"], r["throughput_ratio"],
          (r["peak_gpu_bytes"] or 0) / 2**30] for r in rows])
    md = (f"# Data parallel fine-tuning vs one GPU\n\nModel: {ref['base']} (from {ref['source_model']}); data "
          f"{ref['data']}; {ref['train']['steps']} steps of {ref['train']['seq_len']} tokens; eval: {ref['eval']}.\n\n"
          f"Device: {ref['device']}. The loss of a data-parallel step is the mean over the GPUs. The noise row is "
          f"the one-GPU run with another seed (other data order and adapter initialisation).\n\n{table}\n")
    plot = out.with_suffix(".png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, r in [(ref_name, ref), ("1 GPU, other seed", noise), *others]:
            ax.plot([s["step"] for s in r["history"]["steps"]], losses(r), label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        md += f"\n![loss curves]({plot.name})\n"
    except ImportError:
        pass
    write_results(out, {"tail": args.tail, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
