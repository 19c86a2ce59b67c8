"""quantune command line: thin wrappers that parse options, call the library, print a summary."""
from __future__ import annotations

import logging
import re
import sys
from functools import wraps
from pathlib import Path

import click

from quantune.config import MAX_BITS, METHODS, MIN_BITS, QuantConfig, QuantuneError
from quantune.report import eval_rows, human_bytes, markdown_table


def _one_line_errors(fn):
    """Turn quantune's user-facing errors into ``Error: <one line>`` and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantuneError as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from exc

    return wrapper


@click.group()
@click.version_option(package_name="quantune")
@click.option("-v", "--verbose", is_flag=True, help="Log per-layer details.")
def main(verbose: bool) -> None:
    """Shrink causal language models with Kashin (overdetermined-basis) quantization."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def _stem(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name.removesuffix(".gguf")).strip("-")


def _default_out(model: str, method: str, bits: int) -> Path:
    return Path("out") / f"{_stem(model)}-{method}{bits}"


@main.command()
@click.argument("model")
@click.option("--bits", type=float, default=4, show_default=True,
              help=f"Bits per code, {MIN_BITS}..{MAX_BITS}; a fraction (3.5) mixes the two neighbouring widths "
                   "across layers by measured weight error to hit that average.")
@click.option("--method", type=click.Choice(METHODS), default="kashin", show_default=True)
@click.option("--group-size", type=int, default=None, help="Weights per coefficient/scale group (default: a whole row).")
@click.option("--symmetric/--asymmetric", default=True, show_default=True, help="rtn: symmetric or asymmetric grid.")
@click.option("--transform", type=click.Choice(["dct", "hadamard"]), default="dct", show_default=True,
              help="kashin: seeded orthogonal transform.")
@click.option("--u-steps", type=int, default=None, help="kashin: sign steps on U (default: bits - 1, i.e. one V step).")
@click.option("--sweeps", type=int, default=6, show_default=True, help="kashin: refinement sweeps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the transform's random signs.")
@click.option("--skip", multiple=True, help="Keep this module (name or suffix) in full precision; repeatable.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: out/<model>-<method><bits>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--eval-data", default="builtin", show_default=True,
              help="Text for the before/after perplexity: builtin, wikitext2 or a .txt path.")
@click.option("--eval-seq-len", type=int, default=2048, show_default=True)
@click.option("--eval-windows", type=int, default=8, show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the perplexity comparison.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the parameters kept in full precision (embeddings, norms, head).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@_one_line_errors
def quantize(model, bits, method, group_size, symmetric, transform, u_steps, sweeps, seed, skip, out_dir,
             overwrite, eval_data, eval_seq_len, eval_windows, no_eval, dtype, trust_remote_code):
    """Quantize MODEL (built-in name, hub id, local folder or .gguf file) and save it."""
    import torch

    from quantune.pipeline import run_quantize

    if bits != int(bits) and not MIN_BITS < bits < MAX_BITS:
        raise QuantuneError(f"bits must be from {MIN_BITS} to {MAX_BITS} (a fraction mixes two widths), got {bits}")
    target_bits = None if bits == int(bits) else bits
    bits = int(bits)
    cfg = QuantConfig(method=method, bits=bits, target_bits=target_bits, group_size=group_size, symmetric=symmetric, transform=transform,
                      u_steps=u_steps, sweeps=sweeps, seed=seed, skip_modules=tuple(skip))
    out_dir = out_dir or _default_out(model, method, target_bits or bits)
    report = run_quantize(model, cfg, out_dir, eval_data=None if no_eval else eval_data, seq_len=eval_seq_len,
                          windows=eval_windows, overwrite=overwrite, trust_remote_code=trust_remote_code,
                          dtype=getattr(torch, dtype))
    s = report["summary"]
    rows = [["quantized layers", s["quantized_layers"]],
            ["bits per weight (quantized layers, all overhead)", s["bpw_quantized_layers"]],
            ["bits per parameter (whole file)", s["bpw_whole_model"]],
            ["mean relative weight error", s["mean_rel_error"]],
            ["model.safetensors", human_bytes(s["file_bytes"])],
            ["quantize time (s)", s["quantize_seconds"]],
            ["total time (s)", s["total_seconds"]]]
    click.echo("\n" + markdown_table(["quantity", "value"], rows))
    if "eval" in report:
        click.echo(f"\n{report['eval']['protocol']}")
        click.echo(markdown_table(["model", "perplexity", "KL (nats)", "top-1 agreement"],
                                  eval_rows(report["eval"]["results"])))
    click.echo(f"\nwrote {out_dir} (report.md, report.json)")


@main.command(name="eval")
@click.argument("model")
@click.option("--data", default="builtin", show_default=True, help="builtin, wikitext2 or a .txt path.")
@click.option("--reference", default=None, help="Model for KL divergence and top-1 agreement (e.g. the original).")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--windows", type=int, default=None, help="Number of windows (default: all of the text).")
@click.option("--bos/--no-bos", default=None, help="Start each window with BOS (default: if the tokenizer adds one).")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="Where eval_report.{json,md} go (default: MODEL if it is a quantized folder, else out/eval-<model>).")
@_one_line_errors
def eval_cmd(model, data, reference, seq_len, windows, bos, report_dir):
    """Perplexity of MODEL (a quantized folder or any model) and KL divergence against --reference."""
    from quantune.models import is_quantized_folder
    from quantune.pipeline import run_eval

    if report_dir is None:
        report_dir = Path(model) if is_quantized_folder(Path(model)) else Path("out") / f"eval-{_stem(model)}"
    report = run_eval(model, data=data, reference=reference, seq_len=seq_len, windows=windows,
                      report_dir=report_dir, bos=bos)
    click.echo(f"\n{report['protocol']}")
    click.echo(markdown_table(["model", "perplexity", "KL (nats)", "top-1 agreement"], eval_rows(report["results"])))
    click.echo(f"\nwrote {Path(report_dir) / 'eval_report.md'}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--original", default=None, help="The unquantized model, to measure the true error and its flatness.")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="Where inspect.{json,md} and the PNGs go (default: FOLDER/inspect).")
@click.option("--layers", "sample_layers", type=int, default=6, show_default=True,
              help="Layers shown in the histogram plot.")
@_one_line_errors
def inspect(folder, original, report_dir, sample_layers):
    """Per-layer table and plots of a quantized FOLDER: error, convergence, factor histograms."""
    import json

    from quantune.inspect import inspect_folder
    from quantune.plots import plot_factor_histograms, plot_layer_errors

    summary, samples = inspect_folder(folder, original=original, sample_layers=sample_layers)
    report_dir = report_dir or Path(folder) / "inspect"
    report_dir.mkdir(parents=True, exist_ok=True)
    cfg = summary["config"]
    title = f"{folder}: {cfg['method']} {cfg['bits']}-bit"
    plot_factor_histograms(samples, report_dir / "factor_histograms.png", title)
    plot_layer_errors(summary["layers"], report_dir / "layer_errors.png", title)
    crest_keys = sorted({k for row in summary["layers"].values() for k in row if k.startswith("crest_")})
    table = markdown_table(["layer", "shape", "bpw", "rel. error", *crest_keys],
                           [[name, "x".join(map(str, r["shape"])), r["bits_per_weight"], r["rel_error"],
                             *[r.get(k) for k in crest_keys]] for name, r in summary["layers"].items()])
    md = (f"# quantune inspect: {title}\n\nCrest factor = max|x| / rms(x) of the weight (w, original; w_hat, "
          f"dequantized) and of each factor (U in the weight domain, V in the transformed domain).\n\n"
          f"![factor histograms](factor_histograms.png)\n\n![layer errors](layer_errors.png)\n\n{table}\n")
    (report_dir / "inspect.md").write_text(md)
    (report_dir / "inspect.json").write_text(json.dumps(summary, indent=2))
    click.echo(table)
    click.echo(f"\nwrote {report_dir} (inspect.md, inspect.json, factor_histograms.png, layer_errors.png)")


if __name__ == "__main__":
    sys.exit(main())
