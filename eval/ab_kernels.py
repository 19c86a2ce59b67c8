"""A/B: the few-token call (quantune.kernels.fused_matmul, the library's own dispatch) of versions of
quantune/kernels.py side by side in one process: other versions' files (e.g. ``git show REV:quantune/kernels.py >
/tmp/kernels_a.py``) loaded as modules v0, v1, ... next to the working tree's ("tree"). Same layers, same input, same
run: cold L2 (the calls cycle through copies of the weights), CUDA graphs, each version timed ``--repeat`` times in
alternation, so a difference is told from the machine's run-to-run spread. Writes $OUT/ab_kernels.json.

    python -m eval.ab_kernels /tmp/kernels_a.py --methods rtn-2 --shapes 8192x28672,4096x14336 --group 64

``--kashin-group 128``: kashin with coefficients per 128 columns (per row by default). ``--forms``: what each
version's call gets, ``library`` (default) what QuantLinear's kernel path passes (``kernel_form``: kashin's stored
float16 coefficients where quantune.kernels.HALF_COEFFS; versions before the twenty-third session cannot read
them), ``planes`` the float32 planes (``bitplane_form``, which every version reads), ``both`` each version each way
("NAME/planes"): the A/B of HALF_COEFFS, for which no other version is needed; ``folds`` each version with the
kernel path's form and with that form's tied planes unfolded ("NAME/unfolded": every plane read alone), the A/B of
reading kashin's tied steps as one field (QuantConfig.tied_steps; the layers are quantized with ``--kashin-tied``).

    python -m eval.ab_kernels --forms both --methods kashin-4,kashin-2 --kashin-group 128
    python -m eval.ab_kernels --forms folds --methods kashin-4 --kashin-tied 2"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys


from quantune import kernels


def load(path: str, name: str = "quantune.kernels_a"):
    """The kernels module at ``path`` as module ``name`` (its package is quantune, as the working tree's)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("others", nargs="*", help="other versions' kernels.py files")
    p.add_argument("--methods", default="rtn-4,rtn-2")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--group", default="64", help="rtn's group size, or 'row'")
    p.add_argument("--kashin-group", default="row", help="kashin's coefficient group, or 'row' (the default)")
    p.add_argument("--kashin-tied", type=int, default=0, help="kashin's tied steps (QuantConfig.tied_steps)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--forms", choices=("library", "planes", "both", "folds"), default="library",
                   help="the kernel path's forms, the float32 planes, or both for each version (NAME/planes); "
                        "folds: the kernel path's forms with and without their tied planes folded (NAME/unfolded)")
    args = p.parse_args()
    from eval import bench_kernels

    modules = {f"v{i}": load(path, f"quantune.kernels_v{i}") for i, path in enumerate(args.others)}
    modules["tree"] = kernels
    versions = {name + suffix: mod for name, mod in modules.items()
                for suffix in {"library": ("",), "planes": ("/planes",), "both": ("", "/planes"),
                               "folds": ("", "/unfolded")}[args.forms]}
    if len(versions) < 2:
        p.error("nothing to compare: give other versions' files or --forms both")
    bench_kernels.DEV = "cuda"
    bench_kernels.KASHIN_TIED = args.kashin_tied
    group = bench_kernels.parse_group(args.group, "--group")
    out = []
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    kashin_group = bench_kernels.parse_group(args.kashin_group, "--kashin-group")
    for case in bench_kernels.rtn_cases(shapes, args.methods, group, time_bf16=False, kashin_group=kashin_group):
        k, n, x, spec, bits, copies, form, tables = (case.k, case.n, case.x, case.spec, case.bits, case.copies,
                                                      case.form, case.tables)
        row = dict(k=k, n=n, method=spec, group=case.group_label, us={name: [] for name in versions})
        results = {}
        # what QuantLinear's kernel path passes, or (NAME/planes) the float32 planes
        lib = bench_kernels.layer_copies(case.q.codes, case.q.kernel_form(), case.q.kernel_tables(), len(copies))
        unfolded = [(c, dataclasses.replace(f, folds=0), t) for c, f, t in lib]
        layers = {name: copies if name.endswith("/planes") else unfolded if name.endswith("/unfolded") else lib
                  for name in versions}
        row["folds"] = case.q.kernel_form().folds
        for name, mod in versions.items():
            results[name] = bench_kernels.library_call(x, bits, mod)(layers[name][0]).float()
            affine = tables[2]
            try:  # versions from the sixteenth session on take the group size
                tile = mod.gemv_tile(n, affine, k, bits, form.group)
                unroll = mod.gemv_unroll(tile, affine, bits, k, n, form.group)
            except TypeError:
                tile = mod.gemv_tile(n, affine, k, bits)
                unroll = mod.gemv_unroll(tile, affine, bits, k, n)
            row[f"tile_{name}"] = [*tile, unroll]
        first = next(iter(results.values()))
        row["max_diff"] = max(float((first - r).abs().max()) for r in results.values())
        for _ in range(args.repeat):
            for name, mod in versions.items():
                call = bench_kernels.library_call(x, bits, mod)
                row["us"][name].append(bench_kernels.bench(
                    bench_kernels.rotating([lambda c=c, call=call: call(c) for c in layers[name]])) * 1e6)
        print(json.dumps(row), flush=True)
        out.append(row)
    tree = "tree" if "tree" in versions else next(iter(versions))
    bench_kernels.save_sweep([dict(r, us_tree=min(r["us"][tree])) for r in out], "ab_kernels",
                             ("k", "n", "method"), "us_tree")


if __name__ == "__main__":
    main()
