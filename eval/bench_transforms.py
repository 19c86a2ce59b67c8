"""kashin's input transform on one GPU: how fast quantune applies ``Q^T x`` (the seeded DCT or block Hadamard of
the format) to a layer's input, against the torch transform and the device's memory bandwidth.

    python -m eval.bench_transforms --out eval/results/bench_transforms

For each input width K, transform and token count, on one random bf16 input, every path timed in the same run
(CUDA-graph medians) and checked against the float64 transform (relative error):

- decode (1 token, ``--decode-tokens``): the whole preparation a kashin layer's GEMV reads
  (:func:`quantune.kernels.prepared_input` with mode 5's 16-bit pairs: x and ``xq`` cast, de-interleaved, summed
  per word and rounded to 16 bits), the library's path against the same preparation with the transform in torch
  (the path the library took before for the Hadamard transform: ``HADAMARD_KERNEL`` off; the rfft path for the
  DCT), and the bare torch transform of x for scale. A decode step's transform is a few microseconds of launches
  whatever its bytes: read this as latency.
- prefill (``--prefill-tokens``, 2048): ``xq`` in bf16 (:func:`quantune.kernels.prefill_transformed_input`)
  against the torch transform (float32, cast to bf16). 'GB/s': the bytes a transform must move at least (the bf16
  input read once and ``xq`` written once, 4 bytes a value) over its time; 'x copy': that rate as a share of
  ``Tensor.copy_``'s measured rate (read + write counted, eager), the memory bound of a pass that reads and writes
  every value once. Prefill inputs cycle through copies (512 MB together), so no call finds its input in L2.

``--smoke``: the script on the CPU under ``TRITON_INTERPRET=1`` (small widths; measures nothing).
"""
from __future__ import annotations

import argparse

import torch

from eval import bench_kernels as bk
from quantune.report import markdown_table, write_results

WIDTHS = "4096,11008,14336"


def form_for(k: int, transform: str, group: int | None):
    """A kashin-4 layer's transform as the kernels read it (a few rows quantized: the transform depends only on the
    width, group, kind and seed)."""
    from quantune.config import QuantConfig
    from quantune.qlinear import QuantLinear

    lin = torch.nn.Linear(k, 8, bias=False, device=bk.DEV)
    q, _ = QuantLinear.from_linear(lin, QuantConfig(bits=4, transform=transform, group_size=group))
    return q.kernel_form()


def reference(x: torch.Tensor, form) -> torch.Tensor:
    """``Q^T x`` in float64, per group (the torch transform of quantune.transforms)."""
    from quantune.transforms import forward_transform

    t, k = x.shape
    return forward_transform(x.double().reshape(t, k // form.group, form.group), form.transform,
                             form.seed).reshape(t, k)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def xq_of(prepared, t: int, k: int) -> torch.Tensor:
    """``xq`` (T, K) from a preparation's de-interleaved ``xqd`` (T, PER, K / PER)."""
    return prepared[1].permute(0, 2, 1).reshape(t, k)


def case(k: int, transform: str, group: int | None, decode_tokens: int, prefill_tokens: int, copy_bps: float) -> dict:
    from quantune import kernels

    form = form_for(k, transform, group)
    torch.manual_seed(0)
    row = {"in": k, "transform": transform, "group": form.group, "block": None}
    if transform == "hadamard":
        from quantune.transforms import hadamard_block_size

        row["block"] = hadamard_block_size(form.group)
        row["hadamard_kernel"] = kernels.hadamard_log_block(form) > 0
    else:
        row["two_launch_dct"] = kernels.dct_two_stage(form, 4, True)

    x1 = torch.randn(decode_tokens, k, device=bk.DEV, dtype=torch.bfloat16)
    want1 = reference(x1, form)
    lib = lambda: kernels.prepared_input(x1, form, 4, pairs=True, share=False)  # noqa: E731
    row["decode_err"] = rel_err(xq_of(lib(), decode_tokens, k), want1)
    row["decode_s"] = bk.bench(lib)
    before = {"HADAMARD_KERNEL": False} if transform == "hadamard" else {"DCT_TWO_STAGE": False}
    saved = {name: getattr(kernels, name) for name in before}
    try:
        for name, value in before.items():
            setattr(kernels, name, value)
        row["decode_before_err"] = rel_err(xq_of(lib(), decode_tokens, k), want1)
        row["decode_before_s"] = bk.bench(lib)
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
    row["decode_torch_s"] = bk.bench(lambda: kernels.transformed_input(x1.float(), form))

    xp = torch.randn(prefill_tokens, k, device=bk.DEV, dtype=torch.bfloat16)
    nbytes = 4 * xp.numel()  # bf16 in, bf16 out
    copies = [xp] + [xp.clone() for _ in range(bk.cold_copies(2 * xp.numel()) - 1)]
    want = reference(xp, form)
    row["prefill_err"] = rel_err(kernels.prefill_transformed_input(xp, form, torch.bfloat16), want)
    row["prefill_s"] = bk.bench(bk.rotating([lambda x=x: kernels.prefill_transformed_input(x, form, torch.bfloat16)
                                             for x in copies]))
    row["prefill_torch_err"] = rel_err(kernels.transformed_input(xp.float(), form).bfloat16(), want)
    row["prefill_torch_s"] = bk.bench(bk.rotating([lambda x=x: kernels.transformed_input(x.float(), form).bfloat16()
                                                   for x in copies]))
    row["prefill_bytes"] = nbytes
    row["prefill_GBps"] = nbytes / row["prefill_s"] / 1e9
    row["prefill_x_copy"] = nbytes / row["prefill_s"] / copy_bps
    row["prefill_torch_x_copy"] = nbytes / row["prefill_torch_s"] / copy_bps
    return row


def render(rows: list, device: str, decode_tokens: int, prefill_tokens: int) -> str:
    us = lambda s: None if s is None else round(s * 1e6, 2)  # noqa: E731
    headers = ["in", "transform", "group", "block", "decode us (library)", "decode us (before)", "torch xq us",
               "decode rel. err", f"prefill us ({prefill_tokens} tokens)", "torch prefill us", "GB/s", "x copy",
               "torch x copy", "prefill rel. err (torch)"]
    table = [[r["in"], r["transform"], r["group"], r["block"] or "-", us(r["decode_s"]), us(r.get("decode_before_s")),
              us(r["decode_torch_s"]), f"{r['decode_err']:.1e}", us(r["prefill_s"]), us(r["prefill_torch_s"]),
              round(r["prefill_GBps"]), round(r["prefill_x_copy"], 3), round(r["prefill_torch_x_copy"], 3),
              f"{r['prefill_err']:.1e} ({r['prefill_torch_err']:.1e})"] for r in rows]
    return (f"# kashin's input transform\n\nDevice: {device}. Decode: {decode_tokens} token(s), the whole preparation"
            " the GEMV reads (mode 5: x and xq de-interleaved, summed per word, rounded to 16 bits): the library's "
            "path; 'before': the same preparation with the transform in torch (Hadamard: HADAMARD_KERNEL off) or "
            "through cuFFT's rfft (DCT: DCT_TWO_STAGE off); 'torch xq': the torch transform of x alone. Prefill: xq "
            f"in bf16 for {prefill_tokens} tokens, the library's path against the torch transform (float32, cast "
            "to bf16); 'GB/s': 4 bytes a value (bf16 read and written once) over the time; 'x copy': that rate "
            "over Tensor.copy_'s (read + write, eager). CUDA-graph medians; prefill inputs cycled so that none "
            "is in L2. rel. err: against the float64 transform (decode: the float32 xq before its 16-bit "
            "rounding).\n\n" + markdown_table(headers, table) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default=WIDTHS, help="input widths K, comma-separated")
    p.add_argument("--transforms", default="dct,hadamard")
    p.add_argument("--group", default="row", help="the transform's group in columns, or 'row' (the default)")
    p.add_argument("--decode-tokens", type=int, default=1)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--out", default="eval/results/bench_transforms")
    p.add_argument("--smoke", action="store_true", help="CPU check under TRITON_INTERPRET=1; measures nothing")
    args = p.parse_args()
    if args.smoke:
        bk.DEV, args.widths, args.prefill_tokens = "cpu", "256,384", 8
    else:
        bk.probe_device()
    group = bk.parse_group(args.group, "--group")
    copy_bps = bk.bandwidths()["copy_eager"]
    rows = []
    for k in map(int, args.widths.split(",")):
        for transform in args.transforms.split(","):
            rows.append(case(k, transform, group, args.decode_tokens, args.prefill_tokens, copy_bps))
            print({key: v for key, v in rows[-1].items() if not key.endswith("_bytes")}, flush=True)
    device = (f"{torch.cuda.get_device_name() if bk.DEV == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__}, "
              f"Tensor.copy_ {copy_bps / 1e9:.0f} GB/s (read + write, eager)")
    write_results(args.out, {"device": device, "copy_eager_Bps": copy_bps, "group": group, "rows": rows},
                  render(rows, device, args.decode_tokens, args.prefill_tokens))


if __name__ == "__main__":
    main()
