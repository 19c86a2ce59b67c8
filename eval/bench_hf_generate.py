"""Greedy generation through transformers' own ``model.generate`` on a model loaded from a quantune folder.

What a user of plain transformers gets: the folder written by quantune, loaded with
``AutoModelForCausalLM.from_pretrained``, then ``generate`` eagerly (its default dynamic cache) and with
``cache_implementation="static"``, which makes transformers compile the forward (torch.compile,
``reduce-overhead``: CUDA graphs) when the quantizer allows it. Per format (float: the same random model saved
unquantized): new tokens per second of the whole ``generate`` call after a first call in the process (the
static cache's first call, which compiles, timed apart), and how many tokens the compiled call shares with
the eager one.

    python -m eval.bench_hf_generate --formats float,rtn-4,kashin-4 --new-tokens 64 --out $OUT/bench_hf_generate
    python -m eval.bench_hf_generate --smoke   # CPU, a two-layer model, compiled without CUDA graphs
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from eval.random_models import SMOLLM2, random_llama
from quantune.generate import _sync


def _timed_generate(model, ids, new_tokens: int, device: str, **kwargs) -> tuple[torch.Tensor, float]:
    _sync(torch.device(device))
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    _sync(torch.device(device))
    return out[0, ids.shape[1]:], time.perf_counter() - t0


def divergence(model, ids, new_tokens: int, static: dict) -> dict:
    """Both calls again (untimed) with their logits: over the steps where the tokens agree, the largest
    difference of the static call's logits from the eager ones (relative to the eager logits' largest
    magnitude); at the first step where they part, how far apart the eager logits put the eager token and the
    static call's token (a tie within rounding, or a real difference)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    eager = model.generate(ids, **kwargs)
    other = model.generate(ids, **kwargs, **static)
    a, b = eager.sequences[0, ids.shape[1]:], other.sequences[0, ids.shape[1]:]
    la = torch.stack([x[0].float() for x in eager.logits])
    lb = torch.stack([x[0].float() for x in other.logits])
    parted = int((a == b).int().cumprod(0).sum())
    shared = slice(0, parted + 1 if parted < len(a) else parted)  # the parting step's logits: same inputs
    out = {"logits_rel_diff": float((la[shared] - lb[shared]).abs().max() / la[shared].abs().max())}
    if parted < len(a):
        step = la[parted]
        top2 = step.topk(2).values
        out.update(parted_at=parted, eager_top2_gap=float(top2[0] - top2[1]),
                   eager_gap_to_static_token=float(step[a[parted]] - step[b[parted]]),
                   eager_logit_scale=float(step.abs().max()))
    return out


def run_format(fmt: str, shape: dict, new_tokens: int, device: str, workdir: Path, compile_config) -> dict:
    from transformers import AutoModelForCausalLM

    import quantune  # noqa: F401 - registers the quantizer with transformers

    model, _ = random_llama(fmt, shape)
    folder = workdir / fmt
    model.save_pretrained(folder)
    del model
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(3, shape["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    static = {"cache_implementation": "static"}
    if compile_config is not None:
        static["compile_config"] = compile_config
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    row = {"format": fmt, "compileable": getattr(getattr(loaded, "hf_quantizer", None), "is_compileable", None)}
    _timed_generate(loaded, ids, 4, device)  # kernels compiled, allocator warm
    eager, row["eager_s"] = _timed_generate(loaded, ids, new_tokens, device)
    _, row["static_first_s"] = _timed_generate(loaded, ids, new_tokens, device, **static)  # compiles
    compiled, row["static_s"] = _timed_generate(loaded, ids, new_tokens, device, **static)
    row["eager_tokens_per_s"] = new_tokens / row["eager_s"]
    row["static_tokens_per_s"] = new_tokens / row["static_s"]
    row["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    same = int((compiled == eager).int().cumprod(0).sum())
    row["static_tokens_match_eager"] = same
    row["new_tokens"] = new_tokens
    row.update(divergence(loaded, ids, new_tokens, static))
    del loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# transformers `generate` on quantune folders ({meta['model']})", "",
             f"{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}. Batch 1, 16-token "
             f"prompt, {meta['new_tokens']} new tokens (greedy), bf16; the folder loaded with "
             "`AutoModelForCausalLM.from_pretrained`. Eager: `generate` with its default cache. Static: "
             "`cache_implementation=\"static\"`, which compiles the forward (the first such call, with the "
             "compilation, timed apart). Tokens/s of the whole call, after a first call in the process.", "",
             "| format | quantizer compileable | eager tokens/s | static tokens/s | x eager | first static call s "
             "| graphs / breaks | static = eager tokens | logits rel. diff | where they part: eager top-2 gap, "
             "eager gap to the static token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        part = (f"step {r['parted_at']}: {r['eager_top2_gap']:.4f}, {r['eager_gap_to_static_token']:.4f} "
                f"(logits up to {r['eager_logit_scale']:.2f})" if "parted_at" in r else "-")
        lines.append(f"| {r['format']} | {r['compileable']} | {r['eager_tokens_per_s']:.1f} | "
                     f"{r['static_tokens_per_s']:.1f} | {r['static_tokens_per_s'] / r['eager_tokens_per_s']:.2f} | "
                     f"{r['static_first_s']:.1f} | {r['graphs']} / {r['graph_breaks']} | "
                     f"{r['static_tokens_match_eager']} of {r['new_tokens']} | {r['logits_rel_diff']:.2e} | {part} |")
    lines += ["", "Logits rel. diff: the largest difference between the static call's logits and the eager ones "
              "over the steps up to and including the first where their tokens part (same inputs there), "
              "relative to the eager logits' largest magnitude (bf16 steps are 2^-8 relative)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="float,rtn-4,kashin-4")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="eval/results/bench_hf_generate")
    p.add_argument("--smoke", action="store_true", help="CPU, a two-layer model, compiled without CUDA graphs")
    args = p.parse_args()
    import transformers

    compile_config = None
    shape = SMOLLM2
    device = "cuda"
    if args.smoke:
        from transformers.generation.configuration_utils import CompileConfig

        shape = dict(SMOLLM2, num_hidden_layers=2, vocab_size=512, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2)
        device = "cpu"
        compile_config = CompileConfig(mode="default")
        compile_config._compile_all_devices = True  # transformers compiles in generate on accelerators only
    elif not torch.cuda.is_available():
        raise SystemExit("bench_hf_generate needs a CUDA GPU (or --smoke)")
    meta = {"model": "random weights of SmolLM2-135M's shape" if not args.smoke else "a two-layer random Llama",
            "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
            "torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": args.new_tokens}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            rows.append(run_format(fmt, shape, args.new_tokens, device, Path(tmp), compile_config))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    text = render(rows, meta)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
