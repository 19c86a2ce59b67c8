"""quantune command line: thin wrappers that parse options, call the library, print a summary."""
from __future__ import annotations

import logging
import re
import sys
from functools import wraps
from pathlib import Path

import click

from quantune.config import MAX_BITS, METHODS, MIN_BITS, QuantConfig, QuantuneError
from quantune.generate import MODES as GENERATE_MODES
from quantune.report import eval_rows, human_bytes, markdown_table


def _one_line_errors(fn):
    """Turn quantune's user-facing errors into ``Error: <one line>`` and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantuneError as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from exc
        except RuntimeError as exc:
            if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
                raise
            detail = str(exc).splitlines()[0] if str(exc) else "out of memory"
            raise click.ClickException(f"the GPU ran out of memory ({detail.rstrip('.')}); free it, or use smaller "
                                       f"settings (e.g. --dtype bfloat16, a smaller --batch-size) or --device cpu"
                                       ) from exc

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
@click.option("--tied-steps", type=int, default=0, show_default=True,
              help="kashin: U's smallest sign steps sharing one doubling coefficient, read as one plane by the GPU "
                   "kernel (4 bits: 2 ties two of U's three steps; U's first step stays free); costs some accuracy.")
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
@click.option("--stream", is_flag=True,
              help="Quantize tensor by tensor from the safetensors shards, never loading the whole model "
                   "(local folders and built-in models).")
@click.option("--device", default="cpu", show_default=True,
              help="Where to run the quantization and the before/after perplexity (cpu, cuda, cuda:N).")
@_one_line_errors
def quantize(model, bits, method, group_size, symmetric, transform, u_steps, tied_steps, sweeps, seed, skip, out_dir,
             overwrite, eval_data, eval_seq_len, eval_windows, no_eval, dtype, trust_remote_code, stream, device):
    """Quantize MODEL (built-in name, hub id, local folder or .gguf file) and save it."""
    import torch

    from quantune.pipeline import run_quantize

    if bits != int(bits) and not MIN_BITS < bits < MAX_BITS:
        raise QuantuneError(f"bits must be from {MIN_BITS} to {MAX_BITS} (a fraction mixes two widths), got {bits}")
    target_bits = None if bits == int(bits) else bits
    bits = int(bits)
    cfg = QuantConfig(method=method, bits=bits, target_bits=target_bits, group_size=group_size, symmetric=symmetric, transform=transform,
                      u_steps=u_steps, tied_steps=tied_steps, sweeps=sweeps, seed=seed, skip_modules=tuple(skip))
    out_dir = out_dir or _default_out(model, method, target_bits or bits)
    report = run_quantize(model, cfg, out_dir, eval_data=None if no_eval else eval_data, seq_len=eval_seq_len,
                          windows=eval_windows, overwrite=overwrite, trust_remote_code=trust_remote_code,
                          dtype=getattr(torch, dtype), stream=stream, device=device)
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
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="A LoRA adapter folder (from quantune finetune) applied on top of MODEL.")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="Where eval_report.{json,md} go (default: the adapter folder, else MODEL if it is a quantized "
                   "folder, else out/eval-<model>).")
@click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU if there is one), cuda, cuda:N "
                                                                  "or cpu.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Of the full-precision parameters (all of them for a float model; auto: a "
              "quantized folder's as stored, a float model's float32). bfloat16 halves a GPU's memory and runs "
              "quantized layers through the prefill kernels.")
@_one_line_errors
def eval_cmd(model, data, reference, seq_len, windows, bos, adapter, report_dir, device, dtype):
    """Perplexity of MODEL (a quantized folder or any model) and KL divergence against --reference."""
    import torch

    from quantune.models import is_quantized_folder
    from quantune.pipeline import run_eval

    if report_dir is None:
        report_dir = (adapter if adapter else Path(model) if is_quantized_folder(Path(model))
                      else Path("out") / f"eval-{_stem(model)}")
    report = run_eval(model, data=data, reference=reference, seq_len=seq_len, windows=windows,
                      report_dir=report_dir, bos=bos, adapter=adapter, device=device,
                      dtype=None if dtype == "auto" else getattr(torch, dtype))
    click.echo(f"\n{report['protocol']} Run on {report['device']}, {report['dtype']}.")
    click.echo(markdown_table(["model", "perplexity", "KL (nats)", "top-1 agreement"], eval_rows(report["results"])))
    click.echo(f"\nwrote {Path(report_dir) / 'eval_report.md'}")


@main.command(context_settings={"show_default": True})
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue; '-' reads it from standard input.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64)
@click.option("--device", default="auto", help="auto (a CUDA GPU if there is one), cuda, cuda:N or cpu.")
@click.option("--mode", type=click.Choice(GENERATE_MODES), default="auto",
              help="Decode steps: eager, one CUDA graph replayed per token (graph), or graph + torch.compile "
                   "(compile; compiles first). auto: graph on a GPU, eager on the CPU.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              help="The full-precision parameters' dtype (auto: bfloat16 on a GPU, float32 on the CPU).")
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="A LoRA adapter folder (from quantune finetune) applied on top of MODEL.")
@click.option("--stop/--no-stop", default=True, help="Stop at the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, timings) instead.")
@_one_line_errors
def generate(model, prompt, max_new_tokens, device, mode, dtype, adapter, stop, as_json):
    """Greedy continuation of --prompt by MODEL (a quantized folder or any model), with its speed."""
    import json

    import torch

    from quantune.pipeline import run_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    if mode == "compile":
        click.echo("compiling the decode step (can take a minute) ...", err=True)
    result = run_generate(model, prompt, max_new_tokens=max_new_tokens, device=device, mode=mode,
                          dtype=None if dtype == "auto" else getattr(torch, dtype), adapter=adapter, stop=stop)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(result["text"])
    rate = result["decode_tokens_per_s"]
    click.echo(f"{result['new_tokens']} new tokens after a {result['prompt_tokens']}-token prompt"
               f"{' (stopped at end of sequence)' if result['stopped_at_eos'] else ''}; prefill "
               f"{result['prefill_s'] * 1e3:.1f} ms; decode "
               f"{f'{rate:.1f} tokens/s' if rate else '-'} ({result['mode']}, {result['device_name']}, "
               f"{result['dtype']})", err=True)


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


def _csv(value: str | None):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@main.command(context_settings={"show_default": True})
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("--data", "data", multiple=True, default=("builtin",),
              help="Training text: .txt, .jsonl (see --text-field) or builtin; repeatable.")
@click.option("--text-field", default="text", help="Field holding the text in .jsonl data.")
@click.option("--eval-data", default=None, help="Held-out text for perplexity before, during and after training.")
@click.option("--eval-windows", type=int, default=8)
@click.option("--eval-seq-len", type=int, default=None, help="Evaluation window length (default: --seq-len).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Adapter folder (default: <QUANTIZED>-lora).")
@click.option("--lora-r", type=int, default=16)
@click.option("--lora-alpha", type=float, default=32.0)
@click.option("--lora-dropout", type=float, default=0.0)
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r.")
@click.option("--target-modules", default=None, help="Comma-separated layer names (default: every quantized Linear).")
@click.option("--init", "init", type=click.Choice(["default", "residual"]), default="default",
              help="residual: A, B from the SVD of W - dequant(W_q) (LoftQ-style; needs the original model).")
@click.option("--objective", type=click.Choice(["ce", "kd"]), default=None,
              help="ce: next-token cross-entropy; kd: distillation from the original (default: kd with --teacher).")
@click.option("--teacher", default=None, help="The original full-precision model (default: the one recorded "
                                               "in QUANTIZED/report.json).")
@click.option("--kd-temperature", type=float, default=1.0)
@click.option("--kd-alpha", type=float, default=1.0, help="Weight of distillation vs cross-entropy.")
@click.option("--steps", type=int, default=300)
@click.option("--batch-size", type=int, default=8, help="Sequences per micro-batch (per process).")
@click.option("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, default=512)
@click.option("--lr", type=float, default=2e-4)
@click.option("--lr-scaling", type=click.Choice(["none", "linear", "sqrt"]), default="none",
              help="Scale --lr by the global batch over --base-batch-size (sqrt suits Adam).")
@click.option("--base-batch-size", type=int, default=None)
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine", "wsd"]), default="cosine")
@click.option("--warmup-steps", type=int, default=0)
@click.option("--decay-steps", type=int, default=None, help="wsd: length of the final decay (default 20%).")
@click.option("--min-lr-ratio", type=float, default=0.0)
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--max-grad-norm", type=float, default=1.0, help="Gradient clipping (0: off).")
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default="adamw")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Autocast precision (default: bf16 on GPU, fp32 on CPU).")
@click.option("--grad-checkpointing", is_flag=True)
@click.option("--cache-weights", is_flag=True,
              help="Decode the frozen quantized weights once into the compute dtype: faster steps for one decoded "
                   "copy of the weights in memory (eval/results/bench_finetune.md).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile each decoder layer (faster steps on GPU after a compile of some seconds).")
@click.option("--eval-every", type=int, default=0, help="Evaluate every N steps (0: before and after only).")
@click.option("--save-every", type=int, default=0, help="Checkpoint every N steps (always at the end and on Ctrl-C).")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--gpus", type=int, default=None, help="Data parallel over N GPUs (relaunches under torchrun).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@_one_line_errors
def finetune(quantized, data, text_field, eval_data, eval_windows, eval_seq_len, out_dir, lora_r, lora_alpha,
             lora_dropout, rslora, target_modules, init, objective, teacher, kd_temperature, kd_alpha, steps,
             batch_size, grad_accum, seq_len, lr, lr_scaling, base_batch_size, schedule, warmup_steps, decay_steps,
             min_lr_ratio, weight_decay, max_grad_norm, optimizer, precision, grad_checkpointing, cache_weights,
             compile_, eval_every, save_every, seed, device, gpus, resume):
    """LoRA recovery fine-tuning of a QUANTIZED folder; writes a peft-format adapter and a report."""
    import os

    if gpus is not None and os.environ.get("WORLD_SIZE") is None:
        from quantune.distributed import relaunch_with_torchrun

        argv = sys.argv[1:]
        i = argv.index("--gpus")
        sys.exit(relaunch_with_torchrun(gpus, argv[:i] + argv[i + 2:]))
    from quantune import distributed
    from quantune.finetune import LoraSettings, resolve_device, run_finetune
    from quantune.train import TrainConfig

    dist = distributed.from_environment(device)
    dev = dist.device if dist else resolve_device(device)
    if lora_r < 1:
        raise QuantuneError(f"--lora-r must be >= 1, got {lora_r}")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                      lr_scaling=lr_scaling, base_batch_size=base_batch_size, schedule=schedule,
                      warmup_steps=warmup_steps, decay_steps=decay_steps, min_lr_ratio=min_lr_ratio,
                      weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, optimizer=optimizer,
                      precision=precision or ("bf16" if dev.type == "cuda" else "fp32"),
                      grad_checkpointing=grad_checkpointing, cache_weights=cache_weights, compile=compile_,
                      objective=objective or ("kd" if teacher else "ce"), kd_temperature=kd_temperature,
                      kd_alpha=kd_alpha, eval_every=eval_every, save_every=save_every, seed=seed)
    lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, rslora=rslora,
                        target_modules=_csv(target_modules), init=init)
    out_dir = out_dir or Path(str(quantized).rstrip("/") + "-lora")
    try:
        report = run_finetune(quantized, list(data), out_dir, cfg, lora, eval_data=eval_data,
                              eval_windows=eval_windows, eval_seq_len=eval_seq_len, teacher=teacher, device=device, resume=resume,
                              text_field=text_field, dist=dist, log=click.echo)
    except KeyboardInterrupt:
        click.echo(f"interrupted; resume with: quantune finetune {quantized} ... --out {out_dir} --resume", err=True)
        sys.exit(130)
    finally:
        if dist:
            dist.close()
    if dist is None or dist.rank == 0:
        click.echo(f"\nperplexity before {report['ppl_before']} -> after {report['ppl_after']}; "
                   f"{report['tokens_per_second'] or 0:,.0f} tokens/s")
        click.echo(f"wrote {out_dir} (adapter_config.json, adapter_model.safetensors, report.md, report.json)")


@main.command(context_settings={"show_default": True})
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("--adapter", type=click.Path(path_type=Path), required=True, help="LoRA adapter folder.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@click.option("--requantize", is_flag=True, help="Quantize the merged weights again with the base's settings.")
@click.option("--eval-data", default=None, help="Text to measure what merging (and re-quantizing) costs.")
@click.option("--eval-windows", type=int, default=4)
@click.option("--seq-len", type=int, default=512)
@click.option("--overwrite", is_flag=True)
@click.option("--device", default="cpu", help="Where to merge, re-quantize and evaluate: cpu, cuda, cuda:N or auto.")
@_one_line_errors
def merge(quantized, adapter, out_dir, dtype, requantize, eval_data, eval_windows, seq_len, overwrite, device):
    """Fold an adapter into a float copy of QUANTIZED (dequantized base + B A), saved as a plain
    transformers folder, or re-quantized with --requantize."""
    import torch

    from quantune.finetune import run_merge

    result = run_merge(quantized, adapter, out_dir, dtype=getattr(torch, dtype), requantize=requantize,
                       eval_data=eval_data, eval_windows=eval_windows, seq_len=seq_len, overwrite=overwrite,
                       device=device)
    rows = [[k, v] for k, v in result.items() if k.startswith("ppl_")]
    if rows:
        click.echo(f"{result['protocol']}\n" + markdown_table(["model", "perplexity"], rows))
    click.echo(f"wrote {out_dir}")


@main.command(context_settings={"show_default": True})
@click.argument("model")
@click.option("--mode", type=click.Choice(["full", "lora", "qlora"]), default="lora",
              help="full fine-tuning, LoRA on a full-precision base, or LoRA on a quantized base "
                   "(lora with --bits means qlora).")
@click.option("--bits", type=float, default=None, help="Code width of the quantized base (qlora; default 4).")
@click.option("--method", type=click.Choice(METHODS), default="kashin")
@click.option("--group-size", type=int, default=None)
@click.option("--lora-r", type=int, default=16)
@click.option("--target-modules", default=None, help="Comma-separated LoRA targets (default: every linear layer of the blocks).")
@click.option("--batch-size", type=int, default=8, help="Sequences per micro-batch per GPU.")
@click.option("--seq-len", type=int, default=2048)
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16")
@click.option("--param-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              help="dtype of the full-precision parameters (quantune loads models in fp32).")
@click.option("--master-weights", is_flag=True, help="full: 16-bit weights with an fp32 master copy in the optimizer.")
@click.option("--grad-checkpointing", is_flag=True)
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default="adamw")
@click.option("--cache-weights", is_flag=True, help="qlora: count one decoded copy of the quantized weights.")
@click.option("--teacher", is_flag=True, help="Distillation: the original model is in memory too.")
@click.option("--gpus", type=int, default=1, help="GPUs (figures are per GPU).")
@click.option("--fsdp", is_flag=True, help="Shard weights, gradients and optimizer states over the GPUs.")
@click.option("--max-memory", default=None, help="Memory per GPU (24GiB, 80GB): answers whether it fits "
                                                  "(exit status 3 when it does not) and what would.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Write report.json and report.md here.")
@_one_line_errors
def memory(model, mode, bits, method, group_size, lora_r, target_modules, batch_size, seq_len, precision, param_dtype,
           master_weights, grad_checkpointing, optimizer, cache_weights, teacher, gpus, fsdp, max_memory, out_dir):
    """Predict the peak GPU memory of fine-tuning MODEL from its config alone (no weights loaded)."""
    import json

    from quantune.memory import MemorySpec, markdown, parse_size, plan
    from quantune.serialization import write_text_atomic

    if mode == "lora" and bits is not None:
        mode = "qlora"
    limit = parse_size(max_memory) if max_memory else None
    spec = MemorySpec(mode=mode, bits=bits if bits is not None else 4, method=method, group_size=group_size,
                      lora_r=lora_r, target_modules=_csv(target_modules), batch_size=batch_size, seq_len=seq_len,
                      precision=precision, param_dtype=param_dtype, master_weights=master_weights,
                      grad_checkpointing=grad_checkpointing, optimizer=optimizer, cache_weights=cache_weights,
                      teacher=teacher, gpus=gpus, fsdp=fsdp)
    est, advice, _ = plan(model, spec, limit)
    text = markdown(est, advice)
    click.echo(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report = est.to_json()
        report["advice"] = advice
        report["max_memory_bytes"] = limit
        write_text_atomic(out_dir / "report.md", text)
        write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))
        click.echo(f"wrote {out_dir} (report.md, report.json)")
    if limit is not None and est.peak_bytes + est.fragmentation_bytes > limit:
        sys.exit(3)


if __name__ == "__main__":
    sys.exit(main())
