"""Greedy generation of a real checkpoint through `quantune generate`'s library calls, per format and mode.

Each format is quantized to a folder (`quantune quantize`'s pipeline, no evaluation) and loaded as
`quantune generate` loads it; then every decode mode runs on it: eager steps, one CUDA graph replayed
per token, and graph + torch.compile. The eager
tokens are the reference; every other mode's tokens are compared with them (the length of the
common prefix). The float model (the checkpoint unquantized, bf16 on the GPU) is the baseline, measured in the same run.
Results: JSON + Markdown (default eval/results/bench_generate_model.*).

    python -m eval.bench_generate_model --model /tmp/smollm2.gguf --formats float,rtn-4,kashin-4
    python -m eval.bench_generate_model --smoke     # CPU, a tiny random Llama, eager only
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

PROMPT = ("The printing press changed how ideas travelled across Europe. In the decades after Gutenberg's "
          "first Bible, printers in Venice, Paris and London")


def _tiny_model_folder(root: Path) -> str:
    """A small random Llama with a byte-level tokenizer trained on Python's docs (the CPU smoke run)."""
    from tests.conftest import tiny_model, tiny_tokenizer

    folder = root / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model argument as quantune takes it (folder, .gguf, hub id)")
    p.add_argument("--formats", default="float,rtn-4,kashin-4", help="float (the checkpoint unquantized) and METHOD-BITS")
    p.add_argument("--modes", default="eager,graph,compile")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workdir", default=None, help="where the quantized folders go (default: a temporary folder)")
    p.add_argument("--out", default="eval/results/bench_generate_model")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny random model, eager only")
    args = p.parse_args()

    from quantune.config import QuantConfig
    from quantune.generate import greedy_generate
    from quantune.pipeline import load_for_generation, run_quantize

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke)")
    modes = ["eager"] if args.smoke else args.modes.split(",")
    if modes[0] != "eager":
        raise SystemExit("--modes must start with eager (the reference tokens)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-"))
    model_arg = args.model or (_tiny_model_folder(work) if args.smoke else None)
    if model_arg is None:
        raise SystemExit("--model is required (or --smoke)")
    rows = []
    for fmt in args.formats.split(","):
        target, quantize_s = model_arg, None
        if fmt != "float":
            method, bits = fmt.split("-")
            target = str(work / fmt)
            t0 = time.perf_counter()
            run_quantize(model_arg, QuantConfig(method=method, bits=int(bits)), target, eval_data=None,
                         overwrite=True, progress=False, device=device)
            quantize_s = time.perf_counter() - t0
        model, tokenizer, info = load_for_generation(target, device=device)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(model.device)
        greedy_generate(model, ids, 4, mode="eager")  # the kernels' first-call compilation, prefill's included
        eager = None
        for mode in modes:
            got = greedy_generate(model, ids, args.new_tokens, mode=mode)
            eager = eager or got
            same = _common_prefix(got.tokens, eager.tokens)
            row = {"format": fmt, "mode": mode, "quantize_s": quantize_s, "new_tokens": len(got.tokens),
                   "prompt_tokens": got.prompt_tokens, "prefill_ms": got.prefill_s * 1e3, "setup_s": got.setup_s,
                   "decode_tokens_per_s": got.decode_tokens_per_s, "tokens_equal_eager": same,
                   "text": tokenizer.decode(got.tokens, skip_special_tokens=True), **info}
            if same < len(got.tokens):  # how near a tie the eager steps had there (teacher-forced logits)
                row.update(_divergence(model, ids, eager.tokens, same, got.tokens[same]))
            print(json.dumps({k: v for k, v in row.items() if k != "text"}), flush=True)
            rows.append(row)
            write_report(rows, args, model_arg)  # after every run: a cut-short run keeps what it measured
        del model


@torch.no_grad()
def _divergence(model, prompt: torch.Tensor, tokens: list, at: int, other: int) -> dict:
    """At the first token where a mode parts from the eager steps: the eager logits' margin between their
    best and second-best tokens, and how far below the best the other mode's token was."""
    ids = torch.cat([prompt, torch.tensor([tokens[:at]], device=prompt.device, dtype=prompt.dtype)], dim=1)
    logits = model(input_ids=ids).logits[0, -1].float()
    top = logits.topk(2).values
    return {"diverge_margin": float(top[0] - top[1]), "diverge_other_gap": float(top[0] - logits[other]),
            "diverge_logit_scale": float(top[0])}


def write_report(rows: list, args, model: str) -> None:
    import transformers

    base = {r["mode"]: r["decode_tokens_per_s"] for r in rows if r["format"] == "float"}
    table = [[r["format"], r["mode"], f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-",
              f"{r['decode_tokens_per_s'] / base[r['mode']]:.2f}x" if base.get(r["mode"]) and r["decode_tokens_per_s"]
              else "-", f"{r['prefill_ms']:.1f}", f"{r['setup_s']:.1f}",
              f"{r['tokens_equal_eager']} of {r['new_tokens']}" + (
                  f" (margin {r['diverge_margin']:.3f}, gap {r['diverge_other_gap']:.3f})" if "diverge_margin" in r
                  else ""), r["text"][:60].replace("\n", " ").replace("|", "/")]
             for r in rows]
    device = rows[0]["device_name"]
    meta = {"model": model, "prompt": PROMPT, "new_tokens": args.new_tokens, "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    smoke = " --smoke" if args.smoke else ""
    command = (f"python -m eval.bench_generate_model{smoke}" + (f" --model {args.model}" if args.model else "")
               + f" --formats {args.formats}" + ("" if args.smoke else f" --modes {args.modes}")
               + f" --new-tokens {args.new_tokens}")
    md = (f"# Greedy generation through `quantune generate` ({model})\n\n"
          f"{device}; torch {torch.__version__}, transformers {transformers.__version__}; batch 1, "
          f"{rows[0]['prompt_tokens']}-token prompt, {args.new_tokens} new tokens, no stop at end of sequence; "
          f"full-precision parameters in {rows[0]['dtype']}. Each model is loaded as `quantune generate` loads it "
          f"(`load_for_generation`): the unquantized model (float) or a folder written by `quantune quantize` "
          f"(one scale or coefficient set a row, the defaults); after a 4-token warm-up generation (the kernels' "
          f"first-call compilation) each mode is one `greedy_generate` call, as `run_generate` makes it. decode: the steps after the "
          f"first new token; x float: against the unquantized model in the same mode, same run; setup: warm-up, "
          f"compilation and graph capture; tokens = eager: how many leading tokens equal the eager steps'; where "
          f"a mode parts from them, margin is the eager logits' lead of the best token over the second there "
          f"(teacher-forced) and gap the lead over the mode's token: a small gap is a near tie that bf16 "
          f"rounding (inductor's fusions, other GEMV launches) can flip.\n\n"
          + markdown_table(["format", "mode", "decode tokens/s", "x float", "prefill ms", "setup s",
                            "tokens = eager", "text (start)"], table)
          + f"\n\nCommand: `{command}`\n")
    write_results(args.out, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()
