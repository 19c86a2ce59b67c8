"""Probe: how fast the H200 streams a low-bit GEMV's codes, with the arithmetic taken away. Triton kernels that
only read a (rows, words) int32 buffer shaped like a layer's 4-bit codes and add the words up, in the access
patterns a GEMV can use:

- ``rows``: one program (one warp) per row block, looping along its rows in tiles of T words (the pattern of
  quantune's GEMV, quantune.kernels._gemv_kernel); ``unroll`` tiles loaded before any is used;
- ``tiles``: the same programs and tiles, the words stored tile-major (program p's i-th tile at ``(i P + p) T``),
  so that the programs' concurrent loads cover one contiguous stretch of memory;
- ``blocks``: a plain streaming read of the buffer in 16 KB blocks, one per program (the read floor).

Next to them, the device's copy bandwidth measured four ways (1 GB, read + write counted): ``Tensor.copy_``
captured in a CUDA graph (what eval/bench_kernels.py reported as "copy bandwidth"), the same launched eagerly,
and a Triton copy kernel in a graph; and the read-only stream of 1 GB (the ``blocks`` kernel), which is the floor
a GEMV's code reads have. Every timed read cycles through copies of the buffer (eval.bench_kernels.cold_copies),
so none is served from L2. Writes $OUT/probe_read_pattern.json (or --out). Run on the GPU: ``python -m
eval.probe_read_pattern``; on the CPU it checks its kernels under TRITON_INTERPRET=1 on a small buffer."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the package's tests skip without Triton
    triton = None

if triton is not None:
    @triton.jit
    def _read_rows(src, out, NW: tl.constexpr, BLOCK_M: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr,
                   TILED: tl.constexpr, NPROG: tl.constexpr):
        """Sum of each row block's words; TILED: the tile-major layout (see the module doc)."""
        p = tl.program_id(0)
        rows = p * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, T)
        acc = tl.zeros([BLOCK_M, T], dtype=tl.int32)
        for i in range(0, NW // T, UNROLL):
            for u in tl.static_range(UNROLL):
                if TILED:
                    ptr = src + ((i + u) * NPROG + p) * (BLOCK_M * T) + tl.arange(0, BLOCK_M)[:, None] * T + cols[None, :]
                else:
                    ptr = src + rows[:, None] * NW + (i + u) * T + cols[None, :]
                acc += tl.load(ptr, eviction_policy="evict_first")
        tl.store(out + rows, tl.sum(acc, axis=1))

    @triton.jit
    def _read_blocks(src, out, BLOCK: tl.constexpr):
        p = tl.program_id(0)
        v = tl.load(src + p * BLOCK + tl.arange(0, BLOCK), eviction_policy="evict_first")
        tl.store(out + p, tl.sum(v, axis=0))

    @triton.jit
    def _copy_blocks(src, dst, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, eviction_policy="evict_first"))


def read_rows(buf: torch.Tensor, block_m: int, t: int, unroll: int, tiled: bool, num_warps: int = 1) -> torch.Tensor:
    rows, nw = buf.shape
    out = torch.empty(rows, device=buf.device, dtype=torch.int32)
    _read_rows[(rows // block_m,)](buf, out, NW=nw, BLOCK_M=block_m, T=t, UNROLL=unroll, TILED=tiled,
                                   NPROG=rows // block_m, num_warps=num_warps)
    return out


def tile_major(buf: torch.Tensor, block_m: int, t: int) -> torch.Tensor:
    """``buf`` (rows, words) stored as :func:`read_rows`' TILED layout expects."""
    rows, nw = buf.shape
    return buf.view(rows // block_m, block_m, nw // t, t).permute(2, 0, 1, 3).contiguous().view(rows, nw)


def read_blocks(buf: torch.Tensor, block: int = 4096) -> torch.Tensor:
    flat = buf.view(-1)
    out = torch.empty(flat.numel() // block, device=buf.device, dtype=torch.int32)
    _read_blocks[(flat.numel() // block,)](flat, out, BLOCK=block, num_warps=4)
    return out


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, block: int = 4096) -> None:
    _copy_blocks[(src.numel() // block,)](src.view(-1), dst.view(-1), BLOCK=block, num_warps=4)


def eager_seconds(fn, reps: int = 20) -> float:
    """Median seconds per call launched from Python, timed with CUDA events around each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


SHAPES = {"4096x14336": (14336, 512), "14336x4096": (4096, 1792), "8192x28672": (28672, 1024)}  # rtn-4 codes
VARIANTS = [(1, 128, 1, False), (1, 256, 1, False), (1, 128, 2, False), (1, 128, 4, False), (4, 64, 1, False),
            (4, 64, 2, False), (1, 128, 1, True), (1, 256, 1, True), (4, 64, 1, True), (1, 128, 2, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "probe_read_pattern.json"))
    args = p.parse_args()
    from eval import bench_kernels

    dev = bench_kernels.probe_device()
    gpu = dev == "cuda"
    if not gpu:  # check the kernels' results; nothing timed
        buf = torch.randint(-1000, 1000, (8, 64), dtype=torch.int32)
        for bm, t, un, tiled in [(1, 16, 2, False), (4, 8, 1, True), (2, 16, 1, True)]:
            src = tile_major(buf, bm, t) if tiled else buf
            got = read_rows(src, bm, t, un, tiled)
            assert torch.equal(got, buf.sum(dim=1, dtype=torch.int32)), (bm, t, un, tiled)
        assert torch.equal(read_blocks(buf, 64), buf.view(-1, 64).sum(dim=1, dtype=torch.int32))
        dst = torch.empty_like(buf)
        copy_blocks(buf, dst, 64)
        assert torch.equal(dst, buf)
        print("probe_read_pattern: CPU check passed (nothing timed)")
        return
    bench = bench_kernels.bench
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    a = torch.randint(-2**31, 2**31 - 1, (1 << 28,), device=dev, dtype=torch.int32)  # 1 GiB
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    result["copy_graph_GBps"] = 2 * nbytes / bench(lambda: b.copy_(a)) / 1e9
    result["copy_eager_GBps"] = 2 * nbytes / eager_seconds(lambda: b.copy_(a)) / 1e9
    result["copy_triton_graph_GBps"] = 2 * nbytes / bench(lambda: copy_blocks(a, b)) / 1e9
    result["read_triton_graph_GBps"] = nbytes / bench(lambda: read_blocks(a)) / 1e9
    print({k: round(v) if isinstance(v, float) else v for k, v in result.items()})
    del a, b
    rows_out = []
    for name, (rows, nw) in SHAPES.items():
        torch.manual_seed(0)
        base = torch.randint(-2**31, 2**31 - 1, (rows, nw), device=dev, dtype=torch.int32)
        n = bench_kernels.cold_copies(base.numel() * 4)
        want = base.sum(dim=1, dtype=torch.int32)
        copies = [base] + [base.clone() for _ in range(n - 1)]
        tiled_cache = {}
        blocks = bench(bench_kernels.rotating([lambda c=c: read_blocks(c) for c in copies]))
        rows_out.append({"shape": name, "pattern": "blocks", "tile": "16 KB", "us": blocks * 1e6,
                         "GBps": base.numel() * 4 / blocks / 1e9})
        for bm, t, unroll, tiled in VARIANTS:
            if (nw // t) % unroll:
                continue
            if tiled:
                key = (bm, t)
                if key not in tiled_cache:
                    tiled_cache[key] = [tile_major(c, bm, t) for c in copies]
                srcs = tiled_cache[key]
            else:
                srcs = copies
            ok = torch.equal(read_rows(srcs[0], bm, t, unroll, tiled), want)
            sec = bench(bench_kernels.rotating([lambda s=s: read_rows(s, bm, t, unroll, tiled) for s in srcs]))
            row = {"shape": name, "pattern": "tiles" if tiled else "rows", "tile": f"{bm}x1x{t}", "unroll": unroll,
                   "us": sec * 1e6, "GBps": base.numel() * 4 / sec / 1e9, "correct": ok}
            rows_out.append(row)
            print(row)
        tiled_cache = None
        copies = None
        torch.cuda.empty_cache()
    result["reads"] = rows_out
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out, time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
