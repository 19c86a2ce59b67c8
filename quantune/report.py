"""Plain-text rendering of reports: Markdown tables for report.md and the console."""
from __future__ import annotations

from quantune.config import QuantConfig


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def eval_rows(evals: dict) -> list[list]:
    return [[name, m.get("ppl"), m.get("kl"), m.get("top1")] for name, m in evals.items()]


def quantize_markdown(report: dict) -> str:
    s, cfg = report["summary"], report["config"]
    width = cfg.get("target_bits") or cfg["bits"]
    out = [f"# quantune report: {report['model']} -> {cfg['method']} {width}-bit", "",
           f"Architecture: {report['architecture']}; quantune {report['quantune_version']}, "
           f"format version {report['format_version']}.", ""]
    settings = [[k, str(v)] for k, v in cfg.items() if k not in ("modules_in_full_precision", "module_bits")]
    module_bits = cfg.get("module_bits") or {}
    if cfg.get("target_bits"):
        settings.append(["layers at the wider width", f"{len(module_bits)} of {len(report['layers'])} "
                                                       f"({cfg['bits'] + 1}-bit; the rest {cfg['bits']}-bit)"])
    if cfg["method"] == "kashin":
        for bits in sorted({cfg["bits"], *module_bits.values()}):
            layer = QuantConfig.from_dict({**cfg, "bits": bits, "module_bits": {}, "target_bits": None,
                                           "modules_in_full_precision": {}})
            tied = f", the {layer.tied} smallest of U tied (one doubling coefficient)" if layer.tied else ""
            settings.append([f"sign steps (U + V), {bits}-bit layers", f"{layer.ku} + {layer.kv}{tied}"])
    out.append(markdown_table(["setting", "value"], settings))
    out += ["", "## Summary", "", markdown_table(["quantity", "value"], [
        ["quantized layers", s["quantized_layers"]],
        ["quantized weights", s["quantized_params"]],
        ["full-precision parameters", f"{s['full_precision_params']} ({report.get('full_precision_dtype', 'float32')})"],
        ["bits per weight, quantized layers (codes + codebooks + scales + seeds)", s["bpw_quantized_layers"]],
        ["bits per parameter, whole file (all stored tensors / original parameters)", s["bpw_whole_model"]],
        ["relative weight error (Frobenius, weighted over layers)", s["mean_rel_error"]],
        ["worst layer relative error", f"{s['max_rel_error']:.4f} ({s['worst_layer']})"],
        ["model.safetensors size", human_bytes(s["file_bytes"])],
        ["quantize time (s)", s["quantize_seconds"]],
        ["total wall time (s)", s["total_seconds"]],
    ])]
    if report.get("eval"):
        ev = report["eval"]
        where = f" Run on {ev['device']}." if ev.get("device") else ""
        out += ["", "## Perplexity", "", f"Protocol: {ev['protocol']}{where}", "",
                markdown_table(["model", "perplexity", "KL to original (nats)", "top-1 agreement"],
                               eval_rows(ev["results"]))]
    out += ["", "## Kept in full precision", "",
            markdown_table(["module", "reason"], [[k, v] for k, v in report["full_precision"].items()])]
    out += ["", "## Layers", "", markdown_table(
        ["layer", "shape", "bits", "group", "bpw", "rel. error", "convergence (error per sweep)", "s"],
        [[name, "x".join(map(str, L["shape"])), L.get("bits", cfg["bits"]), L["group_size"], L["bits_per_weight"],
          L["rel_error"],
          " > ".join(f"{h:.3f}" for h in L["history"]) or "-", L["seconds"]]
         for name, L in report["layers"].items()])]
    return "\n".join(out) + "\n"


def eval_markdown(report: dict) -> str:
    where = f" Run on {report['device']}, {report['dtype']}." if report.get("device") else ""
    out = [f"# quantune eval: {report['model']}", "", f"Protocol: {report['protocol']}{where}", ""]
    if report.get("reference"):
        out += [f"Reference for KL and top-1 agreement: {report['reference']}", ""]
    out.append(markdown_table(["model", "perplexity", "KL to reference (nats)", "top-1 agreement"],
                              eval_rows(report["results"])))
    out += ["", f"Wall time: {report['seconds']:.1f} s", ""]
    return "\n".join(out)


def write_results(out, data: dict, md: str) -> None:
    """A benchmark's results: ``<out>.json`` (the data) and ``<out>.md`` (the table), each
    written atomically, and the table printed."""
    import json
    from pathlib import Path

    from quantune.serialization import write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(data, indent=2))
    write_text_atomic(out.with_suffix(".md"), md)
    print(md)
