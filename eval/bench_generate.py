"""End-to-end greedy generation speed at batch 1: bf16 vs quantune at 4 and 2 bits, one run.

    python -m eval.bench_generate --out eval/results/bench_generate

A Llama-3-8B-shaped model (hidden 4096, 32 layers, MLP 14336, 32 heads, 8 KV heads, vocab
128256) with random bf16 weights is built on the GPU; each contender generates ``--new-tokens``
tokens greedily after a ``--prompt``-token prompt (transformers ``generate``, KV cache, no
sampling). Reported: decode tokens/s (new tokens after the first / their seconds), the prefill
time, peak GPU memory, and the speed-up over bf16 measured in the same run. quantune's layers
are quantized in place on the GPU (the output head and embeddings stay bf16); with at most 16
new tokens per step the fused few-token kernel serves every quantized Linear.
``--smoke`` runs a 2-layer, 256-wide model on the CPU to check the script.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from quantune.report import markdown_table, write_results

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)


def build(shape: dict, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, tie_word_embeddings=False),
                                                 dtype=torch.bfloat16)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate_speed(model, prompt: torch.Tensor, new_tokens: int, device: str) -> dict:
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
    _sync(device)
    prefill = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    _sync(device)
    total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9)
    return {"new_tokens": int(out.shape[1] - prompt.shape[1]), "prefill_s": prefill, "total_s": total,
            "decode_tokens_per_s": (new_tokens - 1) / decode,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
            "first_tokens": out[0, prompt.shape[1]:prompt.shape[1] + 8].tolist(),
            "all_tokens": out[0, prompt.shape[1]:].tolist()}


@torch.no_grad()
def static_decode(model, prompt: torch.Tensor, new_tokens: int, device: str, capture: bool,
                  prefill_model=None, first_step: dict | None = None) -> tuple[list, float]:
    """Greedy decode with a static KV cache, one token per step (:class:`quantune.generate.StaticDecoder`):
    each step either captured once as a CUDA graph and replayed (``capture``), or run eagerly (the same
    kernels launched from Python). ``prefill_model``: runs the prompt instead of ``model`` (a compiled
    model then sees only the decode step's shapes: one compilation). ``first_step``: filled with the
    first decode step's logits from ``model`` and from ``prefill_model`` on the same cache. Returns the
    tokens and the seconds of the steps after the first token."""
    from quantune.generate import StaticDecoder

    decoder = StaticDecoder(model, prompt, new_tokens, prefill_model=prefill_model)
    if first_step is not None:  # both write position p's cache entry from the same inputs
        first_step["model"] = decoder.step().float()
        decoder.rewind()
        first_step["reference"] = decoder.step(prefill_model).float()
        decoder.rewind()
    tokens, _, seconds, _ = decoder.run(new_tokens - 1, capture=capture)
    return tokens, seconds


def graph_decode_speed(model, prompt: torch.Tensor, new_tokens: int, device: str) -> dict:
    """Decode with a static KV cache and one decode step captured as a CUDA graph (replayed per
    token: no Python or launch overhead, what a serving engine does). Validated in the same run: the
    graph's tokens against the same static-cache steps run eagerly."""
    graph_tokens, seconds = static_decode(model, prompt, new_tokens, device, capture=device == "cuda")
    eager_tokens, eager_seconds = static_decode(model, prompt, new_tokens, device, capture=False)
    same = next((i for i, (a, b) in enumerate(zip(graph_tokens, eager_tokens)) if a != b), len(graph_tokens))
    return {"graph_decode_tokens_per_s": (new_tokens - 1) / seconds,
            "static_eager_tokens_per_s": (new_tokens - 1) / eager_seconds,
            "graph_tokens_match_static_eager": same, "graph_first_tokens": graph_tokens[:8],
            "static_eager_tokens": eager_tokens}


def compiled_decode_speed(model, prompt: torch.Tensor, new_tokens: int, device: str, eager_tokens: list,
                          share_inputs: bool = True) -> dict:
    """The same CUDA-graph decode with the model under ``torch.compile`` (inductor fuses the norms,
    rotary embedding, residual adds and activation around the linear layers; each quantune layer is
    one opaque custom op in the graph), checked against the uncompiled static-cache tokens. Only the
    decode step is compiled (the prompt runs uncompiled: one compilation per model). Counts dynamo's
    graph breaks; compares the first decode step's logits with the uncompiled model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    from quantune.compiler import SHARE_INPUTS, compile_model

    SHARE_INPUTS.groups = 0
    compiled = compile_model(model, dynamic=False, share_inputs=share_inputs)
    t0 = time.perf_counter()
    first: dict = {}
    import quantune.qlinear as qlinear

    joined, real = set(), qlinear._joined_forward

    def counted(modules, x):  # which merged groups ran as one launch (counted at run time: a graph from
        ys = real(modules, x)  # inductor's cache skips the pass, and with it the pass's own count)
        if ys is not None:
            joined.add(tuple(m._handle for m in modules))
        return ys

    qlinear._joined_forward = counted
    try:
        static_decode(compiled, prompt, 3, device, capture=False, prefill_model=model, first_step=first)  # compiles
    finally:
        qlinear._joined_forward = real
    compile_s = time.perf_counter() - t0
    breaks = sum(counters["graph_break"].values())
    want, got = first["reference"], first["model"]
    logits_rel = float((got - want).norm() / want.norm())
    tokens, seconds = static_decode(compiled, prompt, new_tokens, device, capture=device == "cuda", prefill_model=model)
    same = next((i for i, (a, b) in enumerate(zip(tokens, eager_tokens)) if a != b), len(tokens))
    return {"compiled_graph_tokens_per_s": (new_tokens - 1) / seconds, "compile_s": compile_s,
            "compiled_tokens_match_static_eager": same, "compiled_logits_rel_diff": logits_rel,
            "graph_breaks": breaks, "shared_input_groups": SHARE_INPUTS.groups if share_inputs else None,
            "one_launch_groups": len(joined)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", default="bf16,kashin-4,kashin-2")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default="eval/results/bench_generate")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-share-pass", action="store_true", help="compile without quantune.compiler.ShareInputs "
                                                                "(each layer prepares its own input)")
    p.add_argument("--compile", action="store_true", help="also decode with the model under torch.compile "
                                                          "(CUDA graph of the compiled step)")
    args = p.parse_args()
    from quantune.config import QuantConfig
    from quantune.quantize import quantize_model

    shape, device = dict(LLAMA3_8B), "cuda"
    if args.smoke:
        shape.update(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
        device = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke)")
    prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    rows = []
    for name in args.contenders.split(","):
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        model = build(shape, device)
        quantize_s = None
        if name != "bf16":
            method, bits = name.split("-")
            t0 = time.perf_counter()
            quantize_model(model, QuantConfig(method=method, bits=int(bits)), progress=False)
            _sync(device)
            quantize_s = time.perf_counter() - t0
        row = {"contender": name, "quantize_s": quantize_s, **generate_speed(model, prompt, args.new_tokens, device)}
        try:
            row.update(graph_decode_speed(model, prompt, args.new_tokens, device))
            row["generate_tokens_match_static_eager"] = next(
                (i for i, (a, b) in enumerate(zip(row["all_tokens"], row["static_eager_tokens"])) if a != b),
                len(row["all_tokens"]))
        except Exception as exc:  # a model that does not capture: report it, keep the eager figure
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if args.compile and "static_eager_tokens" in row:
            try:
                row.update(compiled_decode_speed(model, prompt, args.new_tokens, device, row["static_eager_tokens"],
                                                 share_inputs=not args.no_share_pass))
            except Exception as exc:  # report, keep the other figures
                row["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        row.pop("all_tokens")
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        write_report(rows, args, shape, device)  # after every contender: a run cut short keeps what it measured


def write_report(rows: list, args, shape: dict, device: str) -> None:
    """Speed-ups against the bf16 row of the same run, then the JSON and Markdown reports."""
    base = next((r["decode_tokens_per_s"] for r in rows if r["contender"] == "bf16"), None)
    gbase = next((r.get("graph_decode_tokens_per_s") for r in rows if r["contender"] == "bf16"), None)
    for r in rows:
        r["speedup_vs_bf16"] = r["decode_tokens_per_s"] / base if base else None
        g = r.get("graph_decode_tokens_per_s")
        r["graph_speedup_vs_bf16"] = g / gbase if g and gbase else None
    cbase = next((r.get("compiled_graph_tokens_per_s") for r in rows if r["contender"] == "bf16"), None)
    for r in rows:
        c = r.get("compiled_graph_tokens_per_s")
        r["compiled_speedup_vs_bf16"] = c / cbase if c and cbase else None
    dev = (torch.cuda.get_device_name() if device == "cuda" else "CPU") + f", torch {torch.__version__}"
    out = Path(args.out)
    table = markdown_table(["contender", "eager tokens/s", "x bf16", "CUDA graph tokens/s", "x bf16 (graph)",
                            "graph = static eager (tokens)", "generate = static eager (tokens)", "prefill s", "peak GiB", "quantize s",
                            "first tokens (eager / graph)"],
                           [[r["contender"], r["decode_tokens_per_s"], r["speedup_vs_bf16"],
                             r.get("graph_decode_tokens_per_s") or r.get("graph_error", "-"),
                             r["graph_speedup_vs_bf16"] or "-",
                             f"{r.get('graph_tokens_match_static_eager', '-')} of {args.new_tokens}",
                             f"{r.get('generate_tokens_match_static_eager', '-')} of {args.new_tokens}", r["prefill_s"],
                             r["peak_gpu_gib"] if r["peak_gpu_gib"] is not None else "-", r["quantize_s"] or "-",
                             f"{r['first_tokens'][:4]} / {r.get('graph_first_tokens', [])[:4]}"]
                            for r in rows])
    if args.compile:
        table += "\n\n" + markdown_table(
            ["contender", "compiled + CUDA graph tokens/s", "x bf16 (compiled)", "compiled = static eager (tokens)",
             "first step's logits: compiled vs eager (rel.)", "compile s", "graph breaks", "shared-input groups (pass)",
             "groups run as one launch"],
            [[r["contender"], r.get("compiled_graph_tokens_per_s") or r.get("compile_error", "-"),
              r["compiled_speedup_vs_bf16"] or "-", f"{r.get('compiled_tokens_match_static_eager', '-')} of "
              f"{args.new_tokens}", r.get("compiled_logits_rel_diff", "-"), r.get("compile_s") or "-",
              r.get("graph_breaks", "-"), r.get("shared_input_groups") or "-", r.get("one_launch_groups", "-")]
             for r in rows])
    md = (f"# Greedy generation at batch 1\n\nDevice: {dev}. Model: Llama-3-8B shape, random bf16 weights "
          f"({'smoke: 2 layers, 256 wide' if args.smoke else '32 layers'}); prompt {args.prompt} tokens, "
          f"{args.new_tokens} new tokens, eager: transformers generate with a dynamic KV cache; CUDA graph: a static KV cache and one decode step captured and replayed per token, checked against the same static-cache steps run eagerly (tokens equal up to the stated count; transformers generate's dynamic cache runs other attention kernels, so its tokens can part from the static cache's on a random model's near-tied logits)"
          f"{'; compiled: the model under torch.compile (quantune.compiler.compile_model: inductor, each quantune layer one custom op, quantune::linear, and the layers that read one tensor merged into one quantune::linear_shared that prepares it once unless --no-share-pass), the decode step only (prompt uncompiled), then the same CUDA-graph decode, its first step' + chr(39) + 's logits compared with the eager model' + chr(39) + 's' if args.compile else ''}.\n\n{table}\n")
    write_results(out, {"device": dev, "shape": shape, "prompt": args.prompt,
                                                    "new_tokens": args.new_tokens, "rows": rows}, md)


if __name__ == "__main__":
    main()
