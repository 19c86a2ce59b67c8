"""The bit-plane form and the fused Triton kernel against the decode-then-matmul reference.

Without a GPU the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set in
conftest before triton is imported); timing belongs to eval/bench_kernels.py on the GPU.
"""
import os

import pytest
import torch

from quantune.config import QuantConfig
from quantune.qlinear import QuantLinear

CASES = [
    QuantConfig(bits=4), QuantConfig(bits=2), QuantConfig(bits=3), QuantConfig(bits=4, u_steps=2),
    QuantConfig(bits=4, group_size=64), QuantConfig(bits=2, group_size=96), QuantConfig(bits=4, transform="hadamard"),
    QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(method="rtn", bits=2, symmetric=False),
    QuantConfig(method="rtn", bits=3, group_size=32, symmetric=False), QuantConfig(method="rtn", bits=8),
]
IDS = [f"{c.method}{c.bits}-u{c.ku}-g{c.group_size}-{c.transform}-{'sym' if c.symmetric else 'asym'}" for c in CASES]


def _layer(cfg, out=40, inp=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) * 0.05)
    q, _ = QuantLinear.from_linear(lin, cfg)
    return q


def _form(q):
    return q.method.bitplane_form(q.buffers_dict(), q.out_features, q.in_features, q.qconfig)


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_bitplane_form_reproduces_the_decoded_matmul(cfg):
    from quantune.kernels import bitplane_matmul_reference

    q = _layer(cfg)
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(1))
    want = x @ q.dequantize().T
    got = bitplane_matmul_reference(x, q.codes, _form(q), cfg.bits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_triton_kernel_matches_the_reference(cfg):
    pytest.importorskip("triton")
    from quantune.kernels import bitplane_matmul

    q = _layer(cfg, out=37)  # a row count that is not a multiple of the row tile
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(2))
    want = x @ q.dequantize().T
    got = bitplane_matmul(x, q.codes, _form(q), cfg.bits, block_m=16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tiles_follow_the_group():
    from quantune.kernels import block_k_for

    assert block_k_for(4096) == 256 and block_k_for(96) == 32 and block_k_for(576) == 64
    assert block_k_for(14336) == 256 and block_k_for(24) is None


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_level_table_kernel_matches_the_reference(cfg):
    pytest.importorskip("triton")
    from quantune.kernels import levels_matmul

    q = _layer(cfg, out=37)
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(3))
    want = x @ q.dequantize().T
    got = levels_matmul(x, q.codes, _form(q), cfg.bits, block_m=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rtn_levels_are_affine_and_kashin_levels_are_tables():
    from quantune.kernels import level_tables

    rtn = _layer(QuantConfig(method="rtn", bits=4, group_size=32))
    assert level_tables(_form(rtn), 4)[2] is True


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_rtn_tables_hold_the_stored_coefficients_exactly(symmetric):
    """rtn's kernels read the float16 scales (and minima) the format stores, not float32 copies:
    the symmetric grid's offset -2^(b-1) s is derived (no table), and the values are exact."""
    from quantune.kernels import level_tables

    q = _layer(QuantConfig(method="rtn", bits=4, group_size=32, symmetric=symmetric))
    form = _form(q)
    offset, scale, affine = level_tables(form, 4)
    assert affine and scale.dtype == torch.float16
    assert torch.equal(scale.float(), form.a[..., 0])
    if symmetric:
        assert offset is None
    else:
        assert offset.dtype == torch.float16 and torch.equal(offset.float(), form.bx)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_narrow_rtn_tables_give_the_float32_tables_result(symmetric):
    """The float16 / derived coefficients decode to the same float32 values: bitwise the same output
    as the float32 tables of before, in the GEMV and in the bf16 decode for prefill."""
    pytest.importorskip("triton")
    from quantune.kernels import decode_bf16, gemv_matmul, level_tables

    q = _layer(QuantConfig(method="rtn", bits=4, group_size=32, symmetric=symmetric), out=21, inp=128)
    form = _form(q)
    wide = (form.bx.float().contiguous(), form.a[..., 0].float().contiguous(), True)
    narrow = level_tables(form, 4)
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(9))
    kw = dict(block_m=4, block_w=4, num_warps=1, affine=True, share=False)
    assert torch.equal(gemv_matmul(x, q.codes, form, 4, tables=narrow, **kw),
                       gemv_matmul(x, q.codes, form, 4, tables=wide, **kw))
    assert torch.equal(decode_bf16(q.codes, form, 4, q.in_features, tables=narrow)[0],
                       decode_bf16(q.codes, form, 4, q.in_features, tables=wide)[0])
    kashin = _layer(QuantConfig(method="kashin", bits=4))
    lu, lv, affine = level_tables(_form(kashin), 4)
    assert not affine and lu.shape[-1] == 8 and lv.shape[-1] == 2


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=2), QuantConfig(method="rtn", bits=4, group_size=64)],
                         ids=["kashin4", "kashin2", "rtn4"])
def test_the_dispatched_kernel_matches_the_module(cfg, monkeypatch):
    """What QuantLinear runs on CUDA for few tokens (chosen per format from the H200 measurements),
    on an input longer than one chunk of the input preparation (tiles clamped to a chunk)."""
    pytest.importorskip("triton")
    from quantune import kernels
    from quantune.kernels import fused_matmul

    monkeypatch.setattr(kernels, "PREP_COLUMNS", 64)
    q = _layer(cfg, out=19)  # a partial last row block for every tile height
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(4))
    got = fused_matmul(x, q.codes, q.bitplane_form(), cfg.bits, q.level_tables())
    want = x @ q.dequantize().T
    # modes 5 (kashin) and 6 (rtn): the input rounded to 16 bits per token or chunk of columns
    assert float((got - want).norm() / want.norm()) < 2e-4



def test_the_many_row_2bit_tile_spans_two_input_chunks(monkeypatch):
    """rtn-2's tile for very many rows (made small here) with groups shorter than the row covers two chunks of the
    input's rounding through the library's dispatch and matches the module; with one scale a row the dispatch
    keeps the 4 x 64 tile, and a spanning tile asked for (the scale per word) matches too."""
    pytest.importorskip("triton")
    from quantune import kernels

    monkeypatch.setattr(kernels, "PREP_COLUMNS", 64)
    monkeypatch.setattr(kernels, "GEMV_MANY_ROWS_2BIT", 16)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(5))
    for cfg in (QuantConfig(method="rtn", bits=2, group_size=32), QuantConfig(method="rtn", bits=2)):
        q = _layer(cfg, out=19, inp=256)
        form, tables = q.bitplane_form(), q.level_tables()
        grouped = form.group < 256
        tile = kernels.gemv_tile(19, True, 256, 2, form.group)
        assert kernels.gemv_span(19, True, 2, 256, form.group) == grouped
        assert tile == (kernels.GEMV_TILE_2BIT_SPAN if grouped else kernels.gemv_tile(19, True, 256, 4))
        assert kernels.gemv_unroll(tile, True, 2, 256, 19, form.group) == (2 if grouped else 1)
        got = kernels.fused_matmul(x, q.codes, form, 2, tables)
        want = x @ q.dequantize().T
        assert float((got - want).norm() / want.norm()) < 2e-4
        split = kernels.gemv_split(19, form, 2, 2, 8)  # few rows: the library splits K in two
        spanning = kernels.gemv_matmul(x, q.codes, form, 2, block_m=2, block_w=8, num_warps=1, tables=tables,
                                       unroll=2, span=True, split=split)
        assert float((spanning - want).norm() / want.norm()) < 2e-4
        if grouped:
            assert torch.equal(got, spanning)


GEMV_CASES = [QuantConfig(bits=4), QuantConfig(bits=2), QuantConfig(bits=4, group_size=64),
              QuantConfig(bits=2, group_size=32), QuantConfig(bits=4, transform="hadamard"),
              QuantConfig(bits=8), QuantConfig(bits=4, u_steps=4),
              QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(method="rtn", bits=4),
              QuantConfig(method="rtn", bits=2, symmetric=False), QuantConfig(method="rtn", bits=8, group_size=32)]


@pytest.mark.parametrize("cfg", GEMV_CASES, ids=[f"{c.method}{c.bits}-u{c.ku}-g{c.group_size}-{c.transform}"
                                                 for c in GEMV_CASES])
@pytest.mark.parametrize("block", [(4, 64, 1, 1), (8, 2, 2, 2), (16, 8, 4, 4)], ids=["wide", "narrow", "split"])
@pytest.mark.parametrize("mode", [None, 5, 6], ids=["default", "mode5", "mode6"])
def test_word_gemv_kernel_matches_the_reference(cfg, block, mode):
    """Every code position of a word (the sign bit too), tiles inside and across groups, partial
    row tiles, K split between programs, every decode mode the format allows."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_block_w, gemv_matmul

    affine = cfg.method == "rtn"
    if mode is None and block[3] != 1:
        pytest.skip("the default resolves to mode 5 or 6 (every format here has 2, 4 or 8 bits), which run on every "
                    "tiling; the default's dispatch is checked on one (the wide one)")
    if mode == 5 and affine and block[3] != 1:
        pytest.skip("mode 5 is no rtn default (rtn runs mode 6): rtn's plane sums run on one tiling (the wide one)")
    if mode == 6 and not affine:
        pytest.skip("mode 6 reads an affine grid (rtn)")
    if cfg.bits not in (2, 4, 8):
        pytest.skip("the word kernel serves 2, 4 and 8 bits")
    q = _layer(cfg, out=37, inp=256)
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(5))
    block_m, block_w, warps, split = block
    if gemv_block_w(_form(q), cfg.bits, block_w, split) is None:
        split = 1
    got = gemv_matmul(x, q.codes, _form(q), cfg.bits, block_m=block_m, block_w=block_w, num_warps=warps,
                      split=split, mode=mode)
    want = x @ q.dequantize().T
    assert float((got - want).norm() / want.norm()) < 2e-4  # the input rounded to 16 bits


def test_word_gemv_kernel_refuses_a_mode_the_format_lacks():
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul, prepared_input

    q = _layer(QuantConfig(bits=4), out=8, inp=256)
    for gone in (1, 3, 9):  # modes 0 to 4, the float alternatives, were removed
        with pytest.raises(ValueError, match="unknown GEMV mode"):
            gemv_matmul(torch.randn(1, 256), q.codes, _form(q), 4, mode=gone)
    with pytest.raises(ValueError, match="affine grid"):
        gemv_matmul(torch.randn(1, 256), q.codes, _form(q), 4, mode=6)
    with pytest.raises(ValueError, match="transformed factor"):  # mode 6's chunk-scaled inputs: rtn only
        prepared_input(torch.randn(1, 256), _form(q), 4, pairs="chunk")


def test_quantized_pairs_pack_the_codes_one_shift_reaches():
    """Mode 5's pairs: low/high int16 halves hold the inputs whose codes' bits land in bytes 2h, 2h+1."""
    from quantune.kernels import deinterleave, quantized_pairs

    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(8))
    for bits in (2, 4, 8):
        xd = deinterleave(x, bits)
        pairs, scale = quantized_pairs(xd, bits)
        cpb, per = 8 // bits, 32 // bits
        assert pairs.shape == (2, cpb, 2, 64 // per) and scale.shape == (2,)
        lo = ((pairs << 16) >> 16).float() * scale[:, None, None, None]
        hi = (pairs >> 16).float() * scale[:, None, None, None]
        for k in range(cpb):
            for h in range(2):
                torch.testing.assert_close(lo[:, k, h], xd[:, k + 2 * h * cpb], rtol=0, atol=float(scale.max()))
                torch.testing.assert_close(hi[:, k, h], xd[:, k + (2 * h + 1) * cpb], rtol=0, atol=float(scale.max()))


def test_layers_with_one_input_share_its_transform():
    """q/k/v (and gate/up) get the same input tensor: its transform is computed once, and recomputed
    once the tensor changes in place or another tensor comes."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(QuantConfig(bits=4), out=8, inp=256)
    form = _form(q)
    x = torch.randn(1, 256)
    first = kernels.prepared_input(x, form, 4)
    assert kernels.prepared_input(x, form, 4)[1] is first[1]
    y = kernels.gemv_matmul(x, q.codes, form, 4)
    x.mul_(2)  # same tensor, new values
    doubled = kernels.prepared_input(x, form, 4)
    assert doubled[1] is not first[1]
    # share=False (the compiled custom op's calls): neither reads nor fills the cache
    fresh = kernels.prepared_input(x, form, 4, share=False)
    assert fresh[1] is not doubled[1] and kernels.prepared_input(x, form, 4)[1] is doubled[1]
    torch.testing.assert_close(fresh[1], doubled[1], rtol=0, atol=0)
    torch.testing.assert_close(kernels.gemv_matmul(x, q.codes, form, 4), 2 * y, rtol=1e-5, atol=1e-6)
    assert kernels.prepared_input(x.clone(), form, 4)[1] is not doubled[1]
    kernels.SHARE_INPUTS = False  # switched off: every call prepares its input
    try:
        assert kernels.prepared_input(x, form, 4)[1] is not kernels.prepared_input(x, form, 4)[1]
    finally:
        kernels.SHARE_INPUTS = True


def test_programmatic_dependent_launch_only_on_hopper_cuda():
    """The GEMV asks for programmatic dependent launch only for CUDA inputs on compute capability 9+
    (and never under the interpreter or with GEMV_PDL off): CPU inputs never do."""
    pytest.importorskip("triton")
    from quantune import kernels

    assert not kernels.pdl_enabled(torch.zeros(2))
    if torch.cuda.is_available():
        x = torch.zeros(2, device="cuda")
        assert kernels.pdl_enabled(x) == (torch.cuda.get_device_capability()[0] >= 9 and
                                          os.environ.get("TRITON_INTERPRET", "0") != "1")
        kernels.GEMV_PDL = False
        try:
            assert not kernels.pdl_enabled(x)
        finally:
            kernels.GEMV_PDL = True


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=2, group_size=96),
                                 QuantConfig(bits=4, transform="hadamard"), QuantConfig(method="rtn", bits=4)],
                         ids=["dct-row", "dct-group96", "hadamard", "rtn"])
def test_prepared_input_is_the_transformed_input_deinterleaved(cfg):
    """The fused DCT (two launches where the length splits, else a cast/reorder kernel, an rfft and a post
    kernel) equals the torch transform."""
    pytest.importorskip("triton")
    from quantune import kernels
    from quantune.kernels import deinterleave, prepared_input, quantized_pairs, transformed_input

    q = _layer(cfg, out=8, inp=192)
    form = _form(q)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(7)).bfloat16()
    xd, xqd, xs, xqs, xp, xqp, sc, qsc, xg = prepared_input(x, form, cfg.bits, pairs=True)
    assert xg is None  # group sums come with mode 6's chunk-scaled pairs only
    torch.testing.assert_close(xd, deinterleave(x.float(), cfg.bits), rtol=0, atol=0)
    want = deinterleave(transformed_input(x.float(), form), cfg.bits) if form.ku < cfg.bits else xd
    torch.testing.assert_close(xqd, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs, xd.sum(1), rtol=1e-5, atol=1e-5)  # per 32-bit word of codes
    torch.testing.assert_close(xqs, want.sum(1), rtol=1e-5, atol=1e-5)
    two_stage = kernels.dct_two_stage(form, cfg.bits, True)
    # 192 columns = 3 x 64 split into the two launches; 96-column groups do not (the rfft path)
    assert two_stage == (cfg.method == "kashin" and cfg.transform == "dct" and cfg.group_size is None)
    for got_pairs, got_scale, src in ((xp, sc, xd), (xqp, qsc, want)):  # mode 5's 16-bit inputs
        # the two-launch path rounds the transformed input with a bound known before its outputs are
        scale = _parseval_scale(x.float(), form) if two_stage and src is want else None
        pairs, scale = quantized_pairs(src, cfg.bits, scale)
        torch.testing.assert_close(got_scale, scale, rtol=1e-5, atol=0)
        assert ((got_pairs << 16 >> 16) - (pairs << 16 >> 16)).abs().max() <= 1  # rounding of exact halves
        assert ((got_pairs >> 16) - (pairs >> 16)).abs().max() <= 1


def _parseval_scale(x, form):
    """The two-launch DCT's scale per token, computed with torch.fft: ``max_k2 sqrt(2 N1 E_k2 / G) / 32767``,
    ``E_k2`` the energy of column k2 of the FFT's first stage (see quantune.kernels._dct_stage2_kernel)."""
    from quantune import kernels
    from quantune.transforms import random_signs

    g = form.group
    n1, n2 = kernels.dft_split(g)
    y = x.double().reshape(x.shape[0], -1, g) * random_signs(g, form.seed).double()
    v = torch.cat((y[..., 0::2], y[..., 1::2].flip(-1)), dim=-1)
    a = torch.fft.fft(v.reshape(*v.shape[:2], n2, n1).transpose(-1, -2), dim=-1)  # [.., n1, k2]
    energy = (a.abs() ** 2).sum(-2)  # the twiddles have modulus one
    return (torch.sqrt(energy.amax(dim=(1, 2)) * 2 * n1 / g) / 32767).float()


@pytest.mark.parametrize("cfg", [QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(method="rtn", bits=4),
                                 QuantConfig(method="rtn", bits=2, group_size=32, symmetric=False),
                                 QuantConfig(method="rtn", bits=8, group_size=32),
                                 QuantConfig(method="rtn", bits=4, group_size=128)],
                         ids=["rtn4-g64", "rtn4-row", "rtn2-g32", "rtn8-g32", "rtn4-g128"])
@pytest.mark.parametrize("block", [(4, 128, 4, 1), (16, 8, 2, 2), (8, 4, 1, 1), (4, 32, 1, 1, True)],
                         ids=["wide", "split", "in-group", "two-chunks"])
def test_mode6_is_exact_for_the_chunk_rounded_input(cfg, block, monkeypatch):
    """Mode 6 computes ``x_r W^T`` exactly (up to float32 sums) for ``x`` rounded to 16 bits with one
    scale per chunk of columns: four chunks here, tiles inside a group, across groups and split in K, and
    tiles covering two chunks (``span``: two scales a tile, per group, per word of a row-long group, or
    per chunk-long group). The input's preparation runs two programs a chunk (PREP_SPLIT) for the tiles
    across groups."""
    pytest.importorskip("triton")
    from quantune import kernels

    monkeypatch.setattr(kernels, "PREP_COLUMNS", 128)
    monkeypatch.setattr(kernels, "PREP_SPLIT", 2 if block[1] == 8 else 1)
    kernels._PREPARED.clear()
    q = _layer(cfg, out=21, inp=512)
    form = _form(q)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(11)) * torch.linspace(0.1, 4, 512)
    block_m, block_w, warps, split, span = (*block, False)[:5]
    got = kernels.gemv_matmul(x, q.codes, form, cfg.bits, block_m=block_m, block_w=block_w, num_warps=warps,
                              split=split, mode=6, span=span)
    chunks = x.view(3, 4, 128)
    scale = chunks.abs().amax(-1, keepdim=True) / 32767
    x_r = (torch.round(chunks / scale) * scale).view(3, 512)
    w = q.dequantize()
    torch.testing.assert_close(got, x_r @ w.T, rtol=1e-5, atol=1e-5)
    assert float((got - x @ w.T).norm() / (x @ w.T).norm()) < 2e-4
    xg, sc = (kernels.prepared_input(x, form, cfg.bits, pairs="chunk")[i] for i in (8, 6))
    torch.testing.assert_close(sc, scale.view(3, 4))
    if form.group < 512:  # group sums for tiles across groups or chunks
        torch.testing.assert_close(xg, x_r.view(3, -1, form.group).sum(-1), rtol=1e-5, atol=1e-5)
    else:
        assert xg is None


@pytest.mark.parametrize("group", [64, 1024, None])
def test_long_rows_at_4_bits_round_the_input_per_2048_columns(group):
    """The library's long-row set-up at 4 bits (kernels.ROUNDING_COLUMNS_LONG): one scale per 2048 input columns,
    each chunk prepared by PREP_SPLIT programs, and the long-row tile over 256 words, which adds integers per group,
    or with one group a row per SUM_COLUMNS columns: exact for that rounding."""
    pytest.importorskip("triton")
    from quantune import kernels

    k = kernels.GEMV_LONG_K
    assert kernels.rounding_columns(k, 4) == 2048 and kernels.PREP_SPLIT > 1
    kernels._PREPARED.clear()
    q = _layer(QuantConfig(method="rtn", bits=4, group_size=group), out=3, inp=k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 4, k)
    block_m, warps, block_w = kernels.GEMV_TILE_LONG_ROWS_WIDE
    got = kernels.gemv_matmul(x, q.codes, _form(q), 4, block_m=block_m, block_w=block_w, num_warps=warps)
    chunks = x.view(2, k // 2048, 2048)
    scale = chunks.abs().amax(-1, keepdim=True) / 32767
    x_r = (torch.round(chunks / scale) * scale).view(2, k)
    torch.testing.assert_close(got, x_r @ q.dequantize().T, rtol=1e-5, atol=1e-5)
    xg = kernels.prepared_input(x, _form(q), 4, pairs="chunk")[8]
    sums = x_r.view(2, -1, group or kernels.SUM_COLUMNS).sum(-1)
    torch.testing.assert_close(xg, sums, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cfg", [QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(bits=4)],
                         ids=["rtn4", "kashin4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_gives_a_non_finite_output(cfg, bad):
    """The 16-bit rounding must not turn a NaN or inf activation into finite numbers."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(cfg, out=8, inp=256)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    x[0, 5] = bad
    kernels._PREPARED.clear()
    y = kernels.fused_matmul(x, q.codes, q.bitplane_form(), 4, q.level_tables())
    assert not y[0].isfinite().any() and y[1].isfinite().all()


def test_mode5_falls_back_to_a_shift_per_plane_on_long_rows():
    """8-bit planes gathered as bytes of 2^t could pass 2^31 over 128+ tiles of a row: the kernel then
    shifts each plane down to bit 0 (same result); one-word tiles reach that on a 576-wide row (144 words)."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul

    q = _layer(QuantConfig(bits=8), out=2, inp=576)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(9))
    want = x @ q.dequantize().T
    for block_w in (1, 16):  # 144 tiles per row (fallback) and 9 (planes scaled by 2^t)
        got = gemv_matmul(x, q.codes, _form(q), 8, block_m=2, block_w=block_w, num_warps=1, mode=5)
        assert float((got - want).norm() / want.norm()) < 2e-4


def test_gemv_tiles_keep_enough_warps_in_flight():
    from quantune.kernels import GEMV_MIN_WARPS, gemv_tile, gemv_unroll

    for affine in (True, False):
        for m in (1024, 4096, 14336, 28672):
            block_m, warps, block_w = gemv_tile(m, affine)
            assert block_w in (64, 128)
            if -(-m // block_m) * warps < GEMV_MIN_WARPS:  # too few rows for any candidate: the smallest tile
                assert (block_m, warps) == (2, 1)
    assert gemv_tile(4096, True)[:3] == (2, 1, 128) and gemv_tile(14336, True)[:3] == (4, 1, 64)
    assert gemv_tile(4096, False)[:2] == (2, 1) and gemv_tile(14336, False)[:2] == (2, 1)
    # rtn's long rows, few of them (down projection): one row per warp; short rows or many rows as before
    assert gemv_tile(4096, True, 14336)[:3] == (1, 1, 128) and gemv_tile(4096, True, 4096)[:3] == (2, 1, 128)
    # ... over a whole 2048-column rounding chunk at 4 bits (256 words), else over 1024 columns (the tile is clamped
    # to 64 words at 2 bits); the chunk is 2048 columns only on long rows at 4 bits
    from quantune.kernels import rounding_columns

    assert gemv_tile(4096, True, 14336, 4)[:3] == (1, 1, 256) and gemv_tile(4096, True, 14336, 2)[:3] == (1, 1, 128)
    assert rounding_columns(14336, 4) == 2048 and rounding_columns(8192, 4) == 2048
    assert rounding_columns(4096, 4) == 1024 and rounding_columns(14336, 2) == 1024 and rounding_columns(512, 4) == 512
    assert gemv_tile(28672, True, 8192)[:3] == (4, 1, 64) and gemv_tile(4096, False, 14336)[:2] == (2, 1)
    # rtn at 2 bits takes 4 bits' tiles, rolled, on many rows and very many alike ...
    for m in (14336, 28672):
        tile = gemv_tile(m, True, 4096, 2)
        assert tile == gemv_tile(m, True, 4096, 4) == (4, 1, 64)
        assert gemv_unroll(tile, True, 2, 4096, m) == 1
    # ... except on very many rows with groups shorter than the row: two rows over two input chunks, unrolled twice
    from quantune.kernels import gemv_span

    tile = gemv_tile(28672, True, 4096, 2, 64)
    assert tile == (2, 1, 128) and gemv_unroll(tile, True, 2, 4096, 28672, 64) == 2
    assert gemv_span(28672, True, 2, 4096, 64) and not gemv_span(14336, True, 2, 4096, 64)
    assert not gemv_span(28672, True, 2, 4096, None) and not gemv_span(28672, True, 4, 4096, 64)
    assert gemv_tile(14336, True, 4096, 2, 64) == (4, 1, 64)
    # rtn-4 on very many rows, long or grouped: eight rows a warp; not with one scale a row on short rows, not on
    # fewer rows, not at 2 bits
    assert gemv_tile(28672, True, 8192, 4, 64) == gemv_tile(28672, True, 8192, 4) == (8, 1, 64)
    assert gemv_tile(28672, True, 4096, 4, 64) == (8, 1, 64) and gemv_tile(28672, True, 4096, 4) == (4, 1, 64)
    assert gemv_tile(16384, True, 8192, 4, 64) == (4, 1, 64) and gemv_tile(28672, True, 4096, 2)[0] != 8
    assert all(len(gemv_tile(m, affine, 4096, bits)) == 3 for m in (4096, 28672) for affine in (True, False)
               for bits in (2, 4))  # (rows, warps, words)
    # the K loop unrolled: rtn's long-row tile at 2 bits and its two-chunk tile (above); kashin's
    # two-row tile on long rows (few of them) and at 2 bits; nothing else
    from quantune.kernels import gemv_unroll

    def unroll(m, affine, k, bits):
        return gemv_unroll(gemv_tile(m, affine, k, bits), affine, bits, k, m)

    assert unroll(28672, True, 8192, 4) == 1 and unroll(28672, True, 8192, 2) == 1
    assert unroll(4096, True, 14336, 4) == 1 and unroll(4096, True, 14336, 2) == 2
    assert unroll(4096, True, 4096, 4) == 1 and unroll(28672, False, 8192, 4) == 1 and unroll(28672, False, 8192, 2) == 2
    assert unroll(4096, False, 14336, 4) == 2 and unroll(4096, False, 14336, 2) == 2
    assert unroll(4096, False, 4096, 4) == 1 and unroll(4096, False, 4096, 2) == 2
    assert unroll(14336, False, 4096, 4) == 1 and unroll(6144, False, 4096, 4) == 1  # many rows; q/k/v of an 8B
    assert unroll(14336, False, 4096, 2) == 2


@pytest.mark.parametrize("cfg", [QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(bits=4)],
                         ids=["rtn4", "kashin4"])
@pytest.mark.parametrize("split", [1, 2])
def test_gemv_stores_the_requested_dtype(cfg, split):
    """bf16 out: the float32 sums rounded once (split 2 adds in float32: float32 out)."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul

    q = _layer(cfg, out=24, inp=256)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))
    want = gemv_matmul(x, q.codes, _form(q), 4, block_m=4, block_w=8, num_warps=1, split=split)
    got = gemv_matmul(x, q.codes, _form(q), 4, block_m=4, block_w=8, num_warps=1, split=split,
                      out_dtype=torch.bfloat16)
    assert got.dtype == (torch.bfloat16 if split == 1 else torch.float32)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-6)  # within one bf16 step (the CPU
    # interpreter's cast may truncate where the GPU rounds to nearest)


def test_word_gemv_kernel_refuses_codes_across_words():
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul, gemv_supported

    q = _layer(QuantConfig(bits=3), out=8, inp=256)
    assert not gemv_supported(_form(q), 3, q.codes.shape[1])
    with pytest.raises(ValueError, match="2, 4 and 8-bit codes"):
        gemv_matmul(torch.randn(1, 256), q.codes, _form(q), 3)


@pytest.mark.parametrize("cfg", GEMV_CASES[:4] + GEMV_CASES[7:], ids=[f"{c.method}{c.bits}-g{c.group_size}"
                                                                    for c in GEMV_CASES[:4] + GEMV_CASES[7:]])
@pytest.mark.parametrize("mode", [None, 0])
def test_decode_kernel_rebuilds_the_factors(cfg, mode):
    """bf16 factors for prefill: U + V Q^T is the module's weight, and the two-GEMM product matches."""
    pytest.importorskip("triton")
    from quantune.kernels import decode_bf16, prefill_matmul
    from quantune.transforms import inverse_transform

    q = _layer(cfg, out=37, inp=256)
    form = _form(q)
    u, v = decode_bf16(q.codes, form, cfg.bits, q.in_features, block_m=16, block_w=4, mode=mode)
    w = u.float()
    if v is not None:
        g = form.group
        w = w + inverse_transform(v.float().reshape(-1, g), form.transform, form.seed).reshape(w.shape)
    ref = q.dequantize()
    torch.testing.assert_close(w, ref, rtol=0, atol=float(ref.abs().max()) * 2 ** -7)
    x = torch.randn(20, q.in_features, generator=torch.Generator().manual_seed(6))
    got = prefill_matmul(x.bfloat16(), q.codes, form, cfg.bits).float()
    want = x @ ref.T
    assert float((got - want).norm() / want.norm()) < 1e-2


JOINED_CASES = [QuantConfig(bits=4, group_size=64), QuantConfig(bits=2, group_size=32),
                QuantConfig(bits=4, group_size=128, transform="hadamard"), QuantConfig(bits=2, group_size=16),
                QuantConfig(bits=8, group_size=64), QuantConfig(bits=4, group_size=16, u_steps=1)]


@pytest.mark.parametrize("cfg", JOINED_CASES, ids=[f"{c.bits}-g{c.group_size}-u{c.ku}-{c.transform}"
                                                   for c in JOINED_CASES])
def test_joined_decode_is_the_module_s_weight_and_prefill_takes_it(cfg, monkeypatch):
    """kashin in groups of 16 to 128: the joined decode (U + V Q^T per group, one bf16 tile product with float32
    sums, V and the transform's matrix in bf16) is the module's weight within bf16's precision (37 rows: a partial
    row block; 16-row tiles, several a program), within one bf16 step once rounded, and prefill's single GEMM on it
    computes what the two-GEMM path does."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(cfg, out=37, inp=256)
    form = _form(q)
    assert kernels.joined_decode_supported(form, cfg.bits)
    ref = q.dequantize()
    w32 = kernels.decode_joined_bf16(q.codes, form, cfg.bits, 256, block_m=16, dtype=torch.float32)
    torch.testing.assert_close(w32, ref, rtol=0, atol=float(ref.abs().max()) * 2 ** -8)
    for decode in kernels.JOINED_DECODES:  # converted bits or flipped signs: the same sums
        other = kernels.decode_joined_bf16(q.codes, form, cfg.bits, 256, block_m=16, dtype=torch.float32,
                                           decode=decode)
        torch.testing.assert_close(other, w32, rtol=0, atol=float(ref.abs().max()) * 2 ** -20)
    with pytest.raises(ValueError, match="unknown joined decode"):
        kernels.decode_joined_bf16(q.codes, form, cfg.bits, 256, decode="tables")
    w16 = kernels.decode_joined_bf16(q.codes, form, cfg.bits, 256, block_m=16)
    assert w16.dtype == torch.bfloat16  # the interpreter does not round to nearest: one step, not half
    assert ((w16.float() - w32).abs() <= w32.abs() * 2 ** -7).all()
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    joined = kernels.prefill_matmul(x, q.codes, form, cfg.bits).float()
    monkeypatch.setattr(kernels, "JOINED_PREFILL", False)
    two = kernels.prefill_matmul(x, q.codes, form, cfg.bits).float()
    want = x.float() @ ref.T
    assert float((joined - want).norm() / want.norm()) < 1e-2
    assert float((joined - two).norm() / want.norm()) < 1e-2


def test_joined_decode_whole_tiles():
    """Rows a multiple of the tile (EVEN: no row masks) decode the module's weight too, several tiles a program and
    one, each way to the values."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(QuantConfig(bits=4, group_size=32), out=64, inp=128)
    form = _form(q)
    ref = q.dequantize()
    for block_m in (16, 64):
        for decode in kernels.JOINED_DECODES:
            w = kernels.decode_joined_bf16(q.codes, form, 4, 128, block_m=block_m, dtype=torch.float32, decode=decode)
            torch.testing.assert_close(w, ref, rtol=0, atol=float(ref.abs().max()) * 2 ** -8)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=4, group_size=256),
                                 QuantConfig(bits=4, group_size=96), QuantConfig(bits=4, group_size=8),
                                 QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(bits=3, group_size=64)],
                         ids=["row", "g256", "g96", "g8", "rtn", "3bit"])
def test_joined_decode_refuses_what_it_does_not_serve(cfg):
    """Per-row kashin (a K x K transform), groups above 128 or not a power of two or below 16, formats without a
    transformed factor and codes not in whole words keep the two-GEMM path; asked directly, the decode refuses."""
    pytest.importorskip("triton")
    from quantune import kernels

    inp = 288 if cfg.group_size == 96 else 256
    q = _layer(cfg, out=8, inp=inp)
    form = _form(q)
    assert not kernels.joined_decode_supported(form, cfg.bits)
    with pytest.raises(ValueError, match="joined decode"):
        kernels.decode_joined_bf16(q.codes, form, cfg.bits, inp)


@pytest.mark.parametrize("inp,group,dtype", [(576, None, torch.bfloat16), (1024, 64, torch.float32),
                                             (2048, 512, torch.float16), (270, 27, torch.float32)],
                         ids=["576-row-bf16", "1024-g64-f32", "2048-g512-f16", "270-g27-odd"])
def test_prefill_dct_passes_equal_the_torch_transform(inp, group, dtype, monkeypatch):
    """Prefill's DCT (two Triton passes around one rfft, the first storing or loading out of order): the
    torch transform's ``xq`` for rows of any length (576: an odd half), groups inside a row, a chunk of
    columns spanning several groups or a group spanning several chunks; and the Hadamard transform through its
    own kernel."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(QuantConfig(bits=4, group_size=group), out=8, inp=inp)
    form = _form(q)
    x = torch.randn(5, inp, generator=torch.Generator().manual_seed(11)).to(dtype)
    want = kernels.transformed_input(x.float(), form)
    for gather in (False, True):  # the pre pass storing scattered or loading strided
        monkeypatch.setattr(kernels, "PREFILL_DCT_TILES", ((256, 4, gather), (128, 2)))
        got = kernels.prefill_transformed_input(x, form, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert kernels.prefill_transformed_input(x, form, torch.bfloat16).dtype == torch.bfloat16
    monkeypatch.setattr(kernels, "PREFILL_DCT", False)
    torch.testing.assert_close(kernels.prefill_transformed_input(x, form, torch.float32), want)
    monkeypatch.setattr(kernels, "PREFILL_DCT", True)
    if inp % 64:  # hadamard needs blocks of 8 or more
        return
    h = _form(_layer(QuantConfig(bits=4, transform="hadamard"), out=8, inp=inp))
    torch.testing.assert_close(kernels.prefill_transformed_input(x, h, torch.float32),
                               kernels.transformed_input(x.float(), h))


HADAMARD_CASES = {"row-4096": (4096, None), "row-384": (384, None), "row-14336-blocks": (14336, None),
                  "g48-blocks-of-16": (192, 48), "g128": (512, 128), "row-8192": (8192, None)}


@pytest.mark.parametrize("name", list(HADAMARD_CASES))
def test_hadamard_kernel_gives_the_torch_transform(name):
    """The Triton Hadamard transform (butterflies in registers, :func:`quantune.kernels._fwht`) gives the torch
    transform's ``xq`` bit for bit (the same float32 stages in the same order): a row-long block (4096, 8192), a
    row of 14336 = 7 blocks of 2048 a program each, 384 = 3 blocks of 128 in one 512-column program, groups of 48
    (blocks of 16, a group's signs), groups of 128; from bf16 inputs too, and rounded into bf16."""
    pytest.importorskip("triton")
    from quantune import kernels

    inp, group = HADAMARD_CASES[name]
    q = _layer(QuantConfig(bits=4, transform="hadamard", **({"group_size": group} if group else {})), out=4, inp=inp)
    form = _form(q)
    assert kernels.hadamard_log_block(form) == (form.group & -form.group).bit_length() - 1
    x = torch.randn(3, inp, generator=torch.Generator().manual_seed(12))
    want = kernels.transformed_input(x, form)
    assert torch.equal(kernels.hadamard_input(x, form, torch.float32), want)
    xb = x.bfloat16()
    got = kernels.hadamard_input(xb, form, torch.bfloat16)
    assert got.dtype == torch.bfloat16  # rounded once from float32 (the interpreter truncates: within 2^-7)
    torch.testing.assert_close(got.float(), kernels.transformed_input(xb.float(), form), rtol=2 ** -7, atol=1e-6)


def test_hadamard_kernel_stands_aside_where_it_does_not_serve(monkeypatch):
    """Blocks longer than HADAMARD_MAX_BLOCK, the DCT and the switch off: the torch transform."""
    pytest.importorskip("triton")
    from quantune import kernels

    h = _form(_layer(QuantConfig(bits=4, transform="hadamard"), out=4, inp=256))
    assert kernels.hadamard_log_block(h) == 8
    x = torch.randn(2, 256)
    monkeypatch.setattr(kernels, "HADAMARD_MAX_BLOCK", 128)
    assert kernels.hadamard_log_block(h) == 0
    calls = []
    monkeypatch.setattr(kernels, "launch", lambda *a, **kw: calls.append(a[0]))
    assert torch.equal(kernels.hadamard_input(x, h, torch.float32), kernels.transformed_input(x, h))
    assert calls == []  # no kernel launched
    monkeypatch.setattr(kernels, "HADAMARD_MAX_BLOCK", 16384)
    monkeypatch.setattr(kernels, "HADAMARD_KERNEL", False)
    assert kernels.hadamard_log_block(h) == 0
    monkeypatch.setattr(kernels, "HADAMARD_KERNEL", True)
    assert kernels.hadamard_log_block(_form(_layer(QuantConfig(bits=4), out=4, inp=256))) == 0


@pytest.mark.parametrize("inp,group", [(4096, None), (384, None), (512, 128)], ids=["row-4096", "row-384", "g128"])
def test_hadamard_preparation_in_the_kernel_gives_the_torch_one(inp, group):
    """The GEMV's input preparation for a Hadamard layer, the transform inside the preparation kernel: the same
    de-interleaved ``xq``, word sums, 16-bit pairs and scales as the torch transform's ``xq`` given to it, and
    the x side unchanged; the GEMV's result on it matches the decoded product."""
    pytest.importorskip("triton")
    from quantune import kernels

    cfg = QuantConfig(bits=4, transform="hadamard", **({"group_size": group} if group else {}))
    q = _layer(cfg, out=6, inp=inp)
    form = _form(q)
    x = torch.randn(2, inp, generator=torch.Generator().manual_seed(13))
    fused = kernels.prepared_input(x, form, 4, pairs=True, share=False)
    torch_path = kernels.prepared_input(x, form, 4, xq=kernels.transformed_input(x, form), pairs=True, share=False)
    names = ("xd", "xqd", "xs", "xqs", "xp", "xqp", "sc", "qsc")
    for name, a, b in zip(names, fused, torch_path):
        if a.dtype == torch.int32:  # 16-bit pairs: the kernels round halves away from zero, torch to even
            torch.testing.assert_close(a.view(torch.int16), b.view(torch.int16), rtol=0, atol=1, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    plain = kernels.prepared_input(x, form, 4, share=False)  # no 16-bit pairs (the float32 kernels' input)
    assert plain[4] is None and torch.equal(plain[1], fused[1]) and torch.equal(plain[3], fused[3])
    got = kernels.gemv_matmul(x, q.codes, form, 4, share=False)
    want = x @ q.dequantize().T
    assert float((got - want).norm() / want.norm()) < 2e-4


def test_gemv_splits_k_at_most_in_two_so_results_are_reproducible():
    from quantune.kernels import GEMV_MIN_PROGRAMS, gemv_split

    q = _layer(QuantConfig(bits=4), out=8, inp=256)
    form = _form(q)
    assert gemv_split(8, form, 4, block_m=8, block_w=4) == 2  # one row block: split
    assert gemv_split(8 * GEMV_MIN_PROGRAMS, form, 4, block_m=8, block_w=4) == 1  # enough programs already


@pytest.mark.parametrize("cfg", [QuantConfig(method="rtn", bits=4, group_size=64), QuantConfig(bits=2)],
                         ids=["rtn4", "kashin2"])
@pytest.mark.parametrize("rows", [(37, 13, 13), (24, 40)], ids=["three", "two"])
def test_one_launch_for_layers_stored_back_to_back(cfg, rows):
    """Two or three layers' codes and coefficients concatenated by rows: one GEMV launch stores each
    layer's rows in its own output (row tiles across the boundaries included), equal to a launch each."""
    pytest.importorskip("triton")
    import dataclasses

    from quantune.kernels import gemv_matmul, level_tables

    layers = [_layer(cfg, out=n, inp=256, seed=i) for i, n in enumerate(rows)]
    forms = [_form(q) for q in layers]
    form = dataclasses.replace(forms[0], **{f: torch.cat([getattr(fm, f) for fm in forms]) for f in ("a", "bx", "bq")})
    codes = torch.cat([q.codes for q in layers])
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(11))
    got = gemv_matmul(x, codes, form, cfg.bits, block_m=4, block_w=8, num_warps=1, outputs=rows,
                      tables=level_tables(form, cfg.bits))
    assert [tuple(y.shape) for y in got] == [(2, n) for n in rows]
    for y, q, fm in zip(got, layers, forms):
        torch.testing.assert_close(y, gemv_matmul(x, q.codes, fm, cfg.bits, block_m=4, block_w=8, num_warps=1),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="outputs must be 2 or 3"):
        gemv_matmul(x, codes, form, cfg.bits, block_m=4, block_w=8, num_warps=1, outputs=(sum(rows),))


DCT_CASES = {"9x64-6tokens": (576, None, 4, 6), "28x64-2bit": (1792, None, 2, 1), "groups128-8bit": (512, 128, 8, 2),
             "groups64": (256, 64, 4, 3), "72x64-steps": (4608, None, 4, 2)}


@pytest.mark.parametrize("inp,group,bits,tokens,k2", [
    pytest.param(*case, k2, id=f"k2-{k2}-{name}",
                 # many tokens are the interpreter's slowest case: both stage-two widths run on the other cases
                 marks=[pytest.mark.slow] if name == "9x64-6tokens" and k2 == 64 else [])
    for k2 in (16, 64) for name, case in DCT_CASES.items()])
def test_two_launch_dct_equals_the_rfft_path(inp, group, bits, tokens, k2, monkeypatch):
    """The two-launch preparation (stage one, then stage two, of a G = N1 x N2 FFT; N1 padded to a power of two)
    gives the rfft path's inputs: x's parts exactly, the transformed input to float32 rounding; its pairs are
    the transformed input rounded with the Parseval scale; and the GEMV on them stays within 2e-4. Stage two
    with 16 or 64 outputs along k2 per program alike, and in steps along A's rows where N1 > 64 (N1 = 72:
    padded to 128, two steps of 64 a plane, the second mostly padding)."""
    pytest.importorskip("triton")
    from quantune import kernels

    monkeypatch.setattr(kernels, "DCT_STAGE2_K2", k2)
    monkeypatch.setattr(kernels, "DCT_MAX_N1", 256)
    monkeypatch.setattr(kernels, "DCT_LONG_MIN_N1", 65)
    if inp // 64 > 64:
        assert kernels.stage2_chunk(max(16, kernels._pow2(inp // 64))) == 64

    q = _layer(QuantConfig(bits=bits, group_size=group), out=24, inp=inp)
    form = _form(q)
    assert kernels.dct_two_stage(form, bits, True)
    x = torch.randn(tokens, inp, generator=torch.Generator().manual_seed(13)).bfloat16()
    new = kernels.prepared_input(x, form, bits, pairs=True, share=False)
    kernels.DCT_TWO_STAGE = False
    try:
        old = kernels.prepared_input(x, form, bits, pairs=True, share=False)
    finally:
        kernels.DCT_TWO_STAGE = True
    for i in (0, 2, 4, 6):  # xd, xs, xp, sc: the same kernels' arithmetic
        torch.testing.assert_close(new[i], old[i], rtol=0, atol=0)
    for i in (1, 3):  # xqd, xqs
        torch.testing.assert_close(new[i], old[i], rtol=1e-5, atol=2e-5)
    scale = _parseval_scale(x.float(), form)
    torch.testing.assert_close(new[7], scale, rtol=1e-5, atol=0)
    assert bool((new[7] >= old[7] * (1 - 1e-6)).all())  # a bound on the largest output
    pairs = kernels.quantized_pairs(new[1], bits, new[7])[0]
    assert ((new[5] << 16 >> 16) - (pairs << 16 >> 16)).abs().max() <= 1
    assert ((new[5] >> 16) - (pairs >> 16)).abs().max() <= 1
    want = x.float() @ q.dequantize().T
    got = kernels.gemv_matmul(x, q.codes, form, bits, share=False)
    assert float((got - want).norm() / want.norm()) < 2e-4


@pytest.mark.parametrize("inp", [512, 4608], ids=["8x64", "72x64-steps"])
def test_two_launch_dct_scale_holds_for_an_input_on_one_frequency(inp, monkeypatch):
    """The worst input for the bound: all of x's energy in one DCT output. The scale must still cover it
    (no 16-bit overflow) and the GEMV stay right; also with a first factor past 64 (stage two in steps)."""
    pytest.importorskip("triton")
    from quantune import kernels
    from quantune.transforms import inverse_transform

    monkeypatch.setattr(kernels, "DCT_MAX_N1", 256)
    monkeypatch.setattr(kernels, "DCT_LONG_MIN_N1", 65)
    q = _layer(QuantConfig(bits=4), out=16, inp=inp)
    form = _form(q)
    assert kernels.dct_two_stage(form, 4, True)
    spike = torch.zeros(2, inp)
    spike[0, 5], spike[1, 0] = 3.0, -2.0  # the second token on frequency 0 (its twiddle is the smaller one)
    x = inverse_transform(spike, form.transform, form.seed)
    xd, xqd, xs, xqs, xp, xqp, sc, qsc, xg = kernels.prepared_input(x, form, 4, pairs=True, share=False)
    assert bool((xqd.abs().amax(dim=(1, 2)) <= 32767 * qsc * (1 + 1e-5)).all())
    want = x @ q.dequantize().T
    got = kernels.gemv_matmul(x, q.codes, form, 4, share=False)
    assert float((got - want).norm() / want.norm()) < 2e-4


@pytest.mark.parametrize("cfg,block", [(QuantConfig(bits=4), (2, 16, 1)), (QuantConfig(bits=2), (2, 8, 2)),
                                       (QuantConfig(bits=4, group_size=64), (4, 16, 1))],
                         ids=["kashin4-row", "kashin2-row-split", "kashin4-g64"])
def test_late_gemv_gives_the_one_pass_sums(cfg, block):
    """kashin's GEMV in two passes (x's planes, then xq's: the kernel's LATE) computes what one pass computes: the
    same integer plane sums, the per-tile offset terms added in another order (float32 rounding apart)."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul

    q = _layer(cfg, out=9, inp=256)  # a partial last row block
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(8))
    block_m, block_w, split = block
    args = dict(block_m=block_m, block_w=block_w, num_warps=1, split=split, share=False)
    one = gemv_matmul(x, q.codes, _form(q), cfg.bits, late=False, **args)
    two = gemv_matmul(x, q.codes, _form(q), cfg.bits, late=True, **args)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)
    want = x @ q.dequantize().T
    assert float((two - want).norm() / want.norm()) < 2e-4


@pytest.mark.parametrize("cfg,block", [(QuantConfig(bits=4), (2, 16)), (QuantConfig(bits=4), (2, 8)),
                                       (QuantConfig(bits=2), (4, 4)), (QuantConfig(bits=4, group_size=64), (2, 16))],
                         ids=["kashin4-two-tiles", "kashin4-four-tiles", "kashin2-four-tiles", "kashin4-g64-group-sums"])
def test_hold_gemv_gives_the_two_pass_sums(cfg, block):
    """kashin's two-pass GEMV keeping the first pass's codes in registers for the second (the kernel's HOLD: the K
    loop unrolled whole, each tile's words selected by its index) computes exactly what reading them again does:
    two and four tiles a row, 2 and 4 bits, groups shorter than a tile, a partial row block, two tokens."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul

    q = _layer(cfg, out=9, inp=256)
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(10))
    block_m, block_w = block
    args = dict(block_m=block_m, block_w=block_w, num_warps=1, share=False, late=True)
    again = gemv_matmul(x, q.codes, _form(q), cfg.bits, hold=False, **args)
    held = gemv_matmul(x, q.codes, _form(q), cfg.bits, hold=True, **args)
    assert torch.equal(held, again)
    want = x @ q.dequantize().T
    assert float((held - want).norm() / want.norm()) < 2e-4


def test_hold_gemv_is_refused_where_it_cannot_run(monkeypatch):
    """HOLD needs the two-pass loop and a row of at most HOLD_MAX_TILES whole word tiles without a K split; asked
    for otherwise the call says why before any launch. Where GEMV_HOLD is on, the library takes it only there."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(QuantConfig(bits=4), out=8, inp=256)  # 32 words a row
    x = torch.randn(1, 256)
    for bad in (dict(late=False, block_w=16), dict(late=True, block_w=4), dict(late=True, block_w=8, split=2)):
        with pytest.raises(ValueError, match="hold needs late"):
            kernels.gemv_matmul(x, q.codes, _form(q), 4, hold=True, share=False, block_m=2, num_warps=1, **bad)
    calls = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda fn, grid, *a, **kw: calls.append(kw.get("HOLD")) or real(
        fn, grid, *a, **kw))
    monkeypatch.setattr(kernels, "GEMV_HOLD", True)
    for block_w, late in ((8, True), (4, True), (8, False)):
        kernels.gemv_matmul(x, q.codes, _form(q), 4, share=False, block_m=2, block_w=block_w, num_warps=1, late=late)
    assert [c for c in calls if c is not None] == [True, False, False]


GROUP_SUM_CASES = {"kashin4-g64": (QuantConfig(bits=4, group_size=64), (2, 32, 1)),
                   "kashin2-g32-split": (QuantConfig(bits=2, group_size=32), (4, 8, 2)),
                   "kashin8-g16": (QuantConfig(bits=8, group_size=16), (2, 16, 1)),
                   "kashin4-g128-late": (QuantConfig(bits=4, group_size=128), (2, 64, 1))}


@pytest.mark.parametrize("name", list(GROUP_SUM_CASES))
def test_mode5_group_sums_give_the_per_word_sums(name):
    """kashin's GEMV with groups shorter than a word tile: each plane's integer dots summed per group before one
    coefficient per (row, group) (the kernel's GSUM5) computes what a coefficient gathered per word computes
    (float32 rounding apart): several groups a tile, K split, a partial row block, two tokens, and the two-pass
    (LATE) loop; where a group spans the tile the switch changes nothing."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul

    cfg, (block_m, block_w, split) = GROUP_SUM_CASES[name]
    q = _layer(cfg, out=7, inp=256)
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(9))
    args = dict(block_m=block_m, block_w=block_w, num_warps=1, split=split, share=False, mode=5,
                late=name.endswith("late"))
    per_word = gemv_matmul(x, q.codes, _form(q), cfg.bits, group_sums=False, **args)
    per_group = gemv_matmul(x, q.codes, _form(q), cfg.bits, group_sums=True, **args)
    torch.testing.assert_close(per_group, per_word, rtol=1e-5, atol=1e-5)
    want = x @ q.dequantize().T
    assert float((per_group - want).norm() / want.norm()) < 2e-4
    wide = dict(args, block_w=cfg.group_size // (32 // cfg.bits), split=1)  # a tile inside one group: no group sums
    assert torch.equal(gemv_matmul(x, q.codes, _form(q), cfg.bits, group_sums=True, **wide),
                       gemv_matmul(x, q.codes, _form(q), cfg.bits, group_sums=False, **wide))


def test_late_gemv_is_refused_where_it_cannot_run_and_chosen_where_it_helps():
    pytest.importorskip("triton")
    from quantune import kernels

    rtn = _layer(QuantConfig(method="rtn", bits=4, group_size=64), out=8, inp=256)
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="late"):
        kernels.gemv_matmul(x, rtn.codes, _form(rtn), 4, late=True, share=False)
    kashin = _layer(QuantConfig(bits=4), out=8, inp=256)
    form = _form(kashin)
    assert kernels.dct_two_stage(form, 4, True)
    assert kernels.gemv_late(form, 4, 5, kashin.codes, pdl=True)
    assert not kernels.gemv_late(form, 4, 5, kashin.codes, pdl=False)  # nothing would run beside the first pass
    assert not kernels.gemv_late(form, 4, 3, kashin.codes, pdl=True)  # mode 5 only
    assert not kernels.gemv_late(_form(rtn), 4, 5, rtn.codes, pdl=True)  # no transformed factor
    big = torch.empty(kernels.LATE_MAX_BYTES + 4, dtype=torch.uint8)  # codes the second pass would not find in L2
    assert not kernels.gemv_late(form, 4, 5, big, pdl=True)
    wide = _layer(QuantConfig(bits=4), out=8, inp=8192)  # one DCT group of 8192: the rfft path, no TRIGGER_LATE
    assert not kernels.gemv_late(_form(wide), 4, 5, wide.codes, pdl=True)


def test_late_gemv_under_pdl_is_refused_after_a_preparation_that_lets_it_start_early(monkeypatch):
    """Under programmatic dependent launch the first pass reads x's inputs without waiting, which only the
    two-launch preparation makes safe; asked for after the rfft path, the call is refused before any launch."""
    pytest.importorskip("triton")
    from quantune import kernels

    monkeypatch.setattr(kernels, "pdl_enabled", lambda x: True)
    wide = _layer(QuantConfig(bits=4), out=8, inp=8192)
    with pytest.raises(ValueError, match="two-launch"):
        kernels.gemv_matmul(torch.randn(1, 8192), wide.codes, _form(wide), 4, late=True, share=False)


_LATE_PTX = """
import json, sys
from eval.sass_gemv import compile_gemv
out = {}
for late in (False, True):
    out[f"gemv_{late}"] = compile_gemv(dict(K=256, GROUP=256, BITS=4, KU=3, MODE=5, BLOCK_M=2, BLOCK_W=16, SPLIT=1,
                                            ASM=True, PDL=True, LATE=late), ptx=("dp2a",))["ptx_around_wait"]
    out[f"stage2_{late}"] = compile_gemv(dict(K=4096, G=4096, N1=64, N1P=64, N2=64, PER=8, NGP=1, PRECISION="tf32x3",
                                              TRIGGER=True, WAIT=True, BK2=32, TRIGGER_LATE=late), num_warps=4,
                                         ptx=("griddepcontrol.launch_dependents",),
                                         kernel="_dct_stage2_kernel")["ptx_around_wait"]
held = compile_gemv(dict(K=512, GROUP=512, BITS=4, KU=3, MODE=5, BLOCK_M=2, BLOCK_W=16, SPLIT=1, ASM=True,
                         PDL=True, LATE=True, HOLD=True), ptx=("dp2a",))
out["hold"] = dict(held["ptx_around_wait"], loops=held["loop_bodies"], stack=held["stack"])
print(json.dumps(out))
"""


def test_late_gemv_compiles_with_its_wait_between_the_passes():
    """Compiled for the H200 (sm_90, in a child process: the interpreter runs no PTX): with LATE the GEMV's one wait
    for the preparation comes after x's three planes and before xq's one (dp2a instructions 24 before, 8 after; in
    one pass all 32 after), and the DCT's second launch lets the GEMV start only after its own wait. With HOLD the K
    loop is unrolled whole (the words kept in registers for the second pass) and nothing spills."""
    pytest.importorskip("triton")
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _LATE_PTX], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    if run.returncode != 0:
        pytest.skip(f"no sm_90 compile here: {run.stderr.strip().splitlines()[-1]}"[:200])
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["gemv_True"]["dp2a"] == [24, 8] and got["gemv_False"]["dp2a"] == [0, 32]
    assert got["stage2_True"]["griddepcontrol.launch_dependents"] == [0, 1]
    assert got["stage2_False"]["griddepcontrol.launch_dependents"] == [1, 0]
    # HOLD, four 16-word tiles a row: no K loop left and no spills; x's three planes of all four tiles before the wait
    # (4 tiles x 3 planes x 2 byte groups x 2 dp2a), xq's plane after it (4 x 1 x 2 x 2)
    hold = got["hold"]
    assert hold["loops"] == [] and hold["stack"] == 0 and hold["dp2a"] == [48, 16]


def _half_form(q):
    """The layer's form as the kernel path gives it to kashin's word-reading kernels: the stored float16
    coefficients ``c`` instead of float32 ``a``, ``bx``, ``bq``."""
    import dataclasses

    form = _form(q)
    return dataclasses.replace(form, a=None, bx=None, bq=None,
                               c=q.coeffs.view(q.out_features, form.groups, q.qconfig.bits))


HALF_CASES = {"kashin4-row": (QuantConfig(bits=4), (2, 16, 1), False, False),
              "kashin2-row-split": (QuantConfig(bits=2), (2, 8, 2), False, False),
              "kashin4-row-late": (QuantConfig(bits=4), (2, 16, 1), True, False),
              "kashin4-g64-words": (QuantConfig(bits=4, group_size=64), (2, 32, 1), False, False),
              "kashin4-g64-sums": (QuantConfig(bits=4, group_size=64), (2, 32, 1), False, True),
              "kashin8-g16-sums-late": (QuantConfig(bits=8, group_size=16), (2, 16, 1), True, True),
              "kashin2-g32-split": (QuantConfig(bits=2, group_size=32), (4, 8, 2), False, False)}


@pytest.mark.parametrize("name", list(HALF_CASES))
def test_half_coefficients_give_the_float32_planes_results(name):
    """kashin's GEMV (mode 5) reading the stored float16 coefficients (a_t = 2 c_t, bx and bq summed from them:
    HALF) computes what it computes from the float32 planes: a row's one group (the integer sums scaled at the
    end), a coefficient per word, per group sums, the two-pass loop, K split."""
    pytest.importorskip("triton")
    from quantune.kernels import gemv_matmul

    cfg, (block_m, block_w, split), late, sums = HALF_CASES[name]
    q = _layer(cfg, out=7, inp=256)
    x = torch.randn(2, q.in_features, generator=torch.Generator().manual_seed(5))
    args = dict(block_m=block_m, block_w=block_w, num_warps=1, split=split, share=False, mode=5, late=late,
                group_sums=sums)
    half = gemv_matmul(x, q.codes, _half_form(q), cfg.bits, **args)
    torch.testing.assert_close(half, gemv_matmul(x, q.codes, _form(q), cfg.bits, **args), rtol=1e-6, atol=1e-6)
    want = x @ q.dequantize().T
    assert float((half - want).norm() / want.norm()) < 2e-4


# (config, input width, (block_m, block_w, split), late, group sums): a row's one group with the integer sums scaled
# at the end, the float16 coefficients per word, per-group sums, the two-pass loop, a K split, 8 bits with a run of
# five tied planes, no V factor (a field of three planes reaching the code's top bit), and 8 bits on rows so long
# that each plane is gathered with a shift of its own (not SCALED)
FOLD_CASES = {"kashin4-row": (QuantConfig(bits=4, tied_steps=2), 256, (2, 16, 1), False, False),
              "kashin4-row-late-split": (QuantConfig(bits=4, tied_steps=2), 256, (2, 8, 2), True, False),
              "kashin4-g64-words": (QuantConfig(bits=4, group_size=64, tied_steps=2), 256, (2, 32, 1), False, False),
              "kashin4-g64-sums": (QuantConfig(bits=4, group_size=64, tied_steps=2), 256, (2, 32, 1), False, True),
              "kashin8-t5-g16-sums": (QuantConfig(bits=8, group_size=16, tied_steps=5), 128, (2, 16, 1), False, True),
              "kashin4-u4-t3-row": (QuantConfig(bits=4, u_steps=4, tied_steps=3), 256, (2, 16, 1), False, False),
              "kashin8-t5-long-rows": (QuantConfig(bits=8, tied_steps=5), 1024, (1, 1, 1), False, False)}
FOLD_SLOW = {"kashin8-t5-long-rows"}  # 256 one-word steps a row under the interpreter (two rows)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in FOLD_SLOW else n for n in FOLD_CASES])
def test_tied_planes_read_as_one_field_give_every_planes_results(name):
    """kashin's tied steps (coefficients doubling from plane to plane, QuantConfig.tied_steps) are found in the
    stored coefficients, and the GEMV (mode 5) reading each run as one integer field (PLANES) computes what it
    computes reading every plane alone, on the float16 coefficients and on the float32 planes."""
    pytest.importorskip("triton")
    import dataclasses

    from quantune import kernels
    from quantune.kernels import gemv_matmul

    cfg, inp, (block_m, block_w, split), late, sums = FOLD_CASES[name]
    q = _layer(cfg, out=2 if name in FOLD_SLOW else 6, inp=inp)
    tied = cfg.tied
    assert tied >= 2 and _form(q).folds == ((1 << tied) - 1 - 1) << (cfg.ku - tied)  # the run's planes but its first
    planes = kernels.plane_masks(_form(q), cfg.bits)
    assert (planes >> 8 * (cfg.ku - tied)) & 255 == ((1 << tied) - 1) << (cfg.ku - tied)
    x = torch.randn(2, inp, generator=torch.Generator().manual_seed(5))
    args = dict(block_m=block_m, block_w=block_w, num_warps=1, split=split, share=False, mode=5, late=late,
                group_sums=sums)
    want = x @ q.dequantize().T
    for form in (_half_form(q), _form(q)):
        folded = gemv_matmul(x, q.codes, form, cfg.bits, **args)
        torch.testing.assert_close(folded, gemv_matmul(x, q.codes, dataclasses.replace(form, folds=0), cfg.bits,
                                                       **args), rtol=1e-6, atol=1e-6)
        assert float((folded - want).norm() / want.norm()) < 2e-4


def test_free_coefficients_fold_nothing():
    """Coefficients fitted free (the default, tied_steps=0, and every folder written before the setting) fold no
    plane."""
    from quantune import kernels

    q = _layer(QuantConfig(bits=4), out=6, inp=128)
    assert _form(q).folds == 0 and kernels.plane_masks(_form(q), 4) == 0


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4), QuantConfig(bits=2, group_size=64),
                                 QuantConfig(bits=4, group_size=32)], ids=["kashin4-row", "kashin2-g64", "kashin4-g32"])
def test_half_coefficients_decode_the_same_factors(cfg):
    """The prefill decodes from the stored float16 coefficients: the planes decode's U and V, and the joined
    decode's whole weight both ways (bits, signs), equal those from the float32 planes (the signs way from
    zero instead of from the bases: float32 rounding apart)."""
    pytest.importorskip("triton")
    from quantune import kernels

    q = _layer(cfg, out=16, inp=128)
    got = kernels.decode_bf16(q.codes, _half_form(q), cfg.bits, 128, mode=0)
    for g, w in zip(got, kernels.decode_bf16(q.codes, _form(q), cfg.bits, 128, mode=0)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if kernels.joined_decode_supported(_form(q), cfg.bits):
        for decode in kernels.JOINED_DECODES:
            half = kernels.decode_joined_bf16(q.codes, _half_form(q), cfg.bits, 128, decode=decode,
                                              dtype=torch.float32)
            full = kernels.decode_joined_bf16(q.codes, _form(q), cfg.bits, 128, decode=decode, dtype=torch.float32)
            torch.testing.assert_close(half, full, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(half, q.dequantize(), rtol=1e-4, atol=1e-5)
