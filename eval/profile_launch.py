"""Host time of one eager decode call of a quantized layer, piece by piece, on the GPU (no profiler).

Eager decoding of a small model is bound by the host: each quantized layer call costs Python dispatch and one
or more Triton launches. This times, per call, in a loop of back-to-back calls (the GPU work is far shorter
than the host's, so the loop measures the host):

- the float layer (``F.linear`` in bf16) and the quantized layer's ``forward``, ``fused_matmul`` and
  ``prepared_input``, with the input's preparation shared (q/k/v) or not;
- each Triton launch of one call: through ``kernel[grid](...)`` (Triton's binder, cache look-up and launcher),
  and through the compiled kernel's launcher alone;
- eager decode steps of a random model of SmolLM2-135M's shape (30 layers), float and quantized, with
  :class:`quantune.generate.StaticDecoder`, with flags (``--switches launch.FAST_LAUNCH``) on and off.

Run it with an earlier quantune first on PYTHONPATH (without --switches) for a before/after in one call.

    python -m eval.profile_launch --formats rtn-4,kashin-4 --out-json $OUT/profile_launch.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from eval.random_models import SMOLLM2, random_llama


def host_us(fn, n: int) -> float:
    """Median over 5 rounds of the host time per call of ``fn``, ``n`` calls a round."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def record_launches(call):
    """The Triton launches ``call()`` makes: (JITFunction, args, kwargs, grid, compiled kernel)."""
    from triton.runtime.jit import JITFunction

    seen, original = [], JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append((self, args, dict(kwargs), grid, kernel))
        return kernel

    JITFunction.run = run
    try:
        call()
    finally:
        JITFunction.run = original
    return seen


def launch_pieces(seen, n: int) -> list[dict]:
    """Per recorded launch: the time of ``kernel[grid](...)`` and of the compiled kernel's launcher alone."""
    from triton import knobs

    rows = []
    device = torch.cuda.current_device()
    for fn, args, kwargs, grid, kernel in seen:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        binder = fn.device_caches[device][4]
        extra = {"debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                 "instrumentation_mode": knobs.compilation.instrumentation_mode}
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            extra["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        bound = binder(*args, **{**kwargs, **extra})[0]
        values = list(bound.values())
        stream = torch._C._cuda_getCurrentRawStream(device)

        def jit():
            fn[grid](*args, **kwargs)

        def bind():
            binder(*args, **{**kwargs, **extra})

        def direct():
            kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None,
                       None, None, *values)

        rows.append({"kernel": fn.__name__, "grid": list(grid), "args": len(values),
                     "jit_us": host_us(jit, n), "binder_us": host_us(bind, n), "launcher_us": host_us(direct, n)})
    return rows


def layer_pieces(fmt: str, n: int) -> dict:
    from quantune import kernels
    from quantune.config import QuantConfig
    from quantune.quantize import quantize_model

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False)).cuda().to(torch.bfloat16)
    w = lin[0].weight.detach().clone()
    method, bits = fmt.split("-")
    quantize_model(lin, QuantConfig(method=method, bits=int(bits)), progress=False)
    q = lin[0]
    x = torch.randn(1, 1, 576, device="cuda", dtype=torch.bfloat16)
    x2 = x.reshape(1, 576)
    form, tables, codes = q.bitplane_form(), q.level_tables(), q.codes
    out = {"format": fmt, "shape": "576x1536 (in x out), one token, bf16",
           "float_linear_us": host_us(lambda: F.linear(x, w), n),
           "forward_us": host_us(lambda: q(x), n),
           "forward_unshared_us": host_us(lambda: q._inference_forward(x, share=False), n),
           "fused_matmul_unshared_us": host_us(lambda: kernels.fused_matmul(
               x2, codes, form, int(bits), tables, out_dtype=torch.bfloat16, share=False), n),
           "prepared_input_us": host_us(lambda: kernels.prepared_input(
               x2, form, int(bits), pairs=kernels.gemv_pairs(kernels.gemv_default_mode(tables[2], int(bits))),
               trigger=kernels.pdl_enabled(x2), share=False), n),
           "empty_us": host_us(lambda: torch.empty(1, 1536, device="cuda"), n),
           "current_stream_us": host_us(lambda: torch._C._cuda_getCurrentRawStream(0), n)}
    try:  # so that every launch of the recorded call goes through Triton's run (where it exists)
        from quantune import launch
        launch.clear()
    except ImportError:
        pass
    seen = record_launches(lambda: q._inference_forward(x, share=False))
    out["launches"] = launch_pieces(seen, n)
    return out


def decode_rounds(fmt: str, steps: int, rounds: int, settings: list[dict], apply) -> list[dict]:
    """Host-bound eager decode of a random SmolLM2-shaped model: ``rounds`` times ``steps`` steps under each
    setting in turn (alternating, so that drifts of the host's speed reach every setting alike; ``steps`` 2
    and many rounds for the finest alternation). Rows of wall and thread-CPU milliseconds a step."""
    from quantune.generate import StaticDecoder

    model, _ = random_llama(fmt, SMOLLM2, "cuda")
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (1, 16), device="cuda")
    rows = []
    with torch.no_grad():
        decoder = StaticDecoder(model, prompt, (rounds * len(settings) + 1) * (steps + 1) + 2 * len(settings) + 8)
        decoder.run(steps, capture=False)  # warm-up: every kernel compiled
        for r in range(rounds):
            for setting in settings:
                with apply(setting):
                    if r == 0:
                        decoder.run(1, capture=False)  # this setting's first launches (a direct launch's cache)
                    cpu = time.thread_time()
                    _, _, decode_s, _ = decoder.run(steps, capture=False)
                    cpu = time.thread_time() - cpu
                # the thread's CPU time covers run()'s untimed warm-up step too: steps + 1 forward passes
                rows.append({"format": fmt, "setting": setting, "round": r, "wall_ms": decode_s / steps * 1e3,
                             "cpu_ms": cpu / (steps + 1) * 1e3})
    return rows


def summarize(paths: list[str], out: str | None) -> None:
    """Medians over the rounds of every result file given (label, setting, format), as Markdown and JSON."""
    import statistics

    results = [json.load(open(p)) for p in paths]
    groups: dict = {}
    for res in results:
        for row in res["decode"]:
            setting = ",".join(f"{k}={v}" for k, v in row["setting"].items()) or "default"
            groups.setdefault((res.get("label", ""), setting, row["format"]), []).append(row)
    table = []
    for (label, setting, fmt), rows in groups.items():
        wall = statistics.median(r["wall_ms"] for r in rows)
        table.append({"label": label, "setting": setting, "format": fmt, "rounds": len(rows),
                      "wall_ms": wall, "cpu_ms": statistics.median(r["cpu_ms"] for r in rows),
                      "tokens_per_s": 1e3 / wall, "wall_ms_min": min(r["wall_ms"] for r in rows),
                      "wall_ms_max": max(r["wall_ms"] for r in rows)})
    first = results[0]
    lines = [f"# Eager decode host time: a random SmolLM2-135M-shaped model (30 layers), batch 1, bf16",
             "", f"{first['device']}; torch {first['torch']}, triton {first['triton']}. `python -m "
             f"eval.profile_launch`, {len(results)} process{'es' if len(results) > 1 else ''}"
             f"{' (codes alternating)' if len({r.get('label') for r in results}) > 1 else ''}, settings alternating "
             "each round within a process; medians over every round (min-max of the wall time in brackets). "
             "Thread CPU: the process's host thread, per forward pass.", "",
             "| code | setting | format | rounds | ms a step (wall) | ms a step (thread CPU) | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['label']} | {t['setting']} | {t['format']} | {t['rounds']} | {t['wall_ms']:.2f} "
                     f"({t['wall_ms_min']:.1f}-{t['wall_ms_max']:.1f}) | {t['cpu_ms']:.2f} | {t['tokens_per_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out + ".md", "w") as f:
            f.write(text)
        with open(out + ".json", "w") as f:
            json.dump({"device": first["device"], "torch": first["torch"], "triton": first["triton"],
                       "rows": table}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="rtn-4,kashin-4")
    p.add_argument("--calls", type=int, default=300, help="calls per timing round of a layer's pieces")
    p.add_argument("--steps", type=int, default=32, help="eager decode steps per round")
    p.add_argument("--rounds", type=int, default=5, help="decode rounds per setting, alternating")
    p.add_argument("--no-layers", action="store_true", help="time the decode steps only")
    p.add_argument("--switches", default="", help="comma-separated flags (MODULE.NAME under quantune, e.g. "
                   "launch.FAST_LAUNCH) also timed off")
    p.add_argument("--label", default="", help="names the code measured (e.g. a commit) in the summary")
    p.add_argument("--out-json", default=None)
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                   help="no timing: the medians of these result files, written to --out (PREFIX.md/.json)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.out)
        return
    import contextlib
    import importlib

    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "label": args.label, "layers": [], "decode": []}
    switches = [s for s in args.switches.split(",") if s]
    settings = [{}] + [{s: False} for s in switches]

    def flag(name):
        module, attr = name.rsplit(".", 1)
        return importlib.import_module(f"quantune.{module}"), attr

    @contextlib.contextmanager
    def apply(setting):
        saved = {k: getattr(*flag(k)) for k in setting}
        for k, v in setting.items():
            setattr(*flag(k), v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(*flag(k), v)

    formats = args.formats.split(",")
    if not args.no_layers:
        for setting in settings:
            with apply(setting):
                for fmt in formats:
                    row = layer_pieces(fmt, args.calls)
                    row["setting"] = setting
                    result["layers"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "launches"}))
                    for launch in row["launches"]:
                        print("   ", json.dumps(launch))
    for fmt in ["float"] + formats:
        rows = decode_rounds(fmt, args.steps, args.rounds, settings, apply)
        result["decode"] += rows
        for row in rows:
            print(json.dumps(row))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
