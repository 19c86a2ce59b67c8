"""Where eager decoding spends host time: cProfile over greedy eager steps of a random model of a
given Llama shape (SmolLM2-135M's by default), float and quantized, on the GPU.

Eager decoding of a small model is bound by the host (Python and kernel launches), not by the GPU:
this prints the functions that take the most time per decode step, for each format.

    python -m eval.profile_generate_host --formats float,rtn-4 --steps 32 --out $OUT/profile_host.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from eval.random_models import SMOLLM2, random_llama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="float,rtn-4,kashin-4")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the report here")
    p.add_argument("--smoke", action="store_true", help="CPU, two layers")
    args = p.parse_args()
    from quantune.generate import StaticDecoder

    device = "cpu" if args.smoke else "cuda"
    shape = dict(SMOLLM2, num_hidden_layers=2) if args.smoke else SMOLLM2
    report = io.StringIO()
    for fmt in args.formats.split(","):
        model, _ = random_llama(fmt, shape, device)
        prompt = torch.randint(0, shape["vocab_size"], (1, 16), device=device)
        with torch.no_grad():
            decoder = StaticDecoder(model, prompt, 2 * args.steps + 8)
            decoder.run(args.steps, capture=False)  # warm-up: every kernel compiled
            profiler = cProfile.Profile()
            t0 = time.perf_counter()
            profiler.enable()
            decoder.run(args.steps, capture=False)
            profiler.disable()
            seconds = time.perf_counter() - t0
        stats = pstats.Stats(profiler, stream=report)
        report.write(f"\n## {fmt}: {args.steps} eager steps (+1 warm-up), {seconds / (args.steps + 1) * 1e3:.2f} ms a "
                     f"step under cProfile, {shape['num_hidden_layers']} layers, {device}\n")
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        del model, decoder
    print(report.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            f.write(report.getvalue())


if __name__ == "__main__":
    main()
