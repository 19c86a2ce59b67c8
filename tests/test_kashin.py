"""Kashin decomposition: convergence history, accuracy per bit width, small factors, edge cases."""
import math

import pytest
import torch
from torch.testing import assert_close

from quantune.kashin import factor_levels, kashin_decode, kashin_decompose, nearest_level, sign_table
from quantune.transforms import TRANSFORMS, forward_transform

LENGTHS = [96, 576, 1536]



# Relative Frobenius error ceilings on Gaussian rows (16 rows, default 6 sweeps, ku = ceil(b/2)).
# Measured over dct/hadamard x lengths 96/576/1536 (seeds 0-2): 2 bits 0.326-0.345,
# 3 bits 0.177-0.186, 4 bits 0.108-0.118, 8 bits 0.014-0.020. Ceilings sit ~15-50% above the
# worst measurement; the 8-bit one is the brief's 0.05.
ERROR_CEILING = {2: 0.40, 3: 0.22, 4: 0.14, 8: 0.05}


def _split(bits: int) -> tuple[int, int]:
    ku = (bits + 1) // 2
    return ku, bits - ku


def _gaussian(rows: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))


def _rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x_hat - x).norm() / x.norm())


def _factors(f, ku: int, kv: int):
    """Decoded ``U`` (signal domain) and ``V`` (transform domain) of every row."""
    c, idx = f.coeffs.float(), f.codes.long()
    u = factor_levels(c[:, :ku], ku).gather(-1, idx & ((1 << ku) - 1)) if ku else torch.zeros(idx.shape)
    v = factor_levels(c[:, ku:], kv).gather(-1, idx >> ku) if kv else torch.zeros(idx.shape)
    return u, v


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_history_and_stored_error(transform, n, bits):
    ku, kv = _split(bits)
    x = _gaussian(16, n, seed=n + bits)
    f = kashin_decompose(x, ku, kv, transform, seed=5)
    h = f.history
    assert len(h) == 6 + 2  # after init, after each of 6 sweeps, after float16 rounding
    # block-coordinate descent never increases the objective (float32 rounding aside); the last
    # entry re-fits codes to float16 coefficients and may move either way
    for before, after in zip(h[:-2], h[1:-1]):
        assert after <= before + 1e-5, h
    # the recorded final error is the error of what is stored
    x_hat = kashin_decode(f.codes, f.coeffs, ku, kv, transform, 5)
    assert h[-1] == pytest.approx(_rel_error(x, x_hat), rel=1e-4, abs=1e-6)
    assert h[-1] < ERROR_CEILING[bits]
    # storage format
    assert f.codes.dtype == torch.uint8 and f.codes.shape == x.shape
    assert int(f.codes.max()) < 1 << bits
    assert f.coeffs.dtype == torch.float16 and f.coeffs.shape == (16, bits)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("n", [96, 576])
def test_more_bits_lower_error(transform, n):
    x = _gaussian(16, n, seed=1)
    errors = []
    for bits in (2, 3, 4, 8):
        ku, kv = _split(bits)
        f = kashin_decompose(x, ku, kv, transform, seed=0)
        errors.append(_rel_error(x, kashin_decode(f.codes, f.coeffs, ku, kv, transform, 0)))
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4, errors
    assert errors[-1] < 0.05


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("n", LENGTHS)
def test_factors_stay_small_with_an_outlier(transform, n):
    """The Kashin property: both quantized factors have a small infinity norm, even for spiky rows.

    Each row has one entry 30x the Gaussian scale. In units of the row's RMS,
    ``rms = ||x||_2 / sqrt(n)``, that entry is 9.2 (n=96), 18.2 (576) or 23.3 (1536). The factors
    are ``U`` (signal domain) and ``V`` (transform domain, ``x ~= U + Q V``). Measured worst
    ``||U||_inf / rms`` over both transforms, these lengths, 4 and 8 bits and 3 seeds: 1.85;
    ``||V||_inf / rms``: 2.25 (hadamard, n=576, whose 64-blocks spread the spike over only 64
    entries: 30 / sqrt(64) / 1.6 ~= 2.3; the DCT spreads it over all n and stays below 1.4).
    Bound 3.5 leaves ~50% margin and is still far below the outlier.

    Note: ``Q V`` (V mapped back to the signal domain) necessarily carries the spike -- U is
    bounded by ``sum |c_t|`` and ``U + Q V`` reconstructs x -- so the small-norm property is
    asserted on V, the vector the codebook quantizes, as in Kashin's representation.
    """
    rows, bits = 12, 4
    ku, kv = _split(bits)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=gen)
    pos = torch.randint(0, n, (rows,), generator=gen)
    x[torch.arange(rows), pos] = 30.0 * torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0)
    f = kashin_decompose(x, ku, kv, transform, seed=2)
    u, v = _factors(f, ku, kv)
    rms = x.norm(dim=1) / math.sqrt(n)
    outlier = x.abs().amax(dim=1) / rms
    u_ratio = u.abs().amax(dim=1) / rms
    v_ratio = v.abs().amax(dim=1) / rms
    assert (outlier > 9).all()
    assert (u_ratio < 3.5).all(), u_ratio
    assert (v_ratio < 3.5).all(), v_ratio
    assert (torch.maximum(u_ratio, v_ratio) < 0.4 * outlier).all()
    # and the spike itself is still represented (through Q V)
    x_hat = kashin_decode(f.codes, f.coeffs, ku, kv, transform, 2)
    spike_err = (x_hat - x)[torch.arange(rows), pos].abs() / 30.0
    assert spike_err.max() < 0.15, spike_err  # measured <= 0.08


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("ku,kv", [(4, 0), (0, 4), (1, 0), (0, 1), (8, 0), (0, 8)])
def test_one_sided_splits(transform, ku, kv):
    bits = ku + kv
    x = _gaussian(8, 96, seed=3)
    f = kashin_decompose(x, ku, kv, transform, seed=1)
    x_hat = kashin_decode(f.codes, f.coeffs, ku, kv, transform, 1)
    assert torch.isfinite(x_hat).all()
    assert int(f.codes.max()) < 1 << bits and f.coeffs.shape == (8, bits)
    assert f.history[-1] == pytest.approx(_rel_error(x, x_hat), rel=1e-4, abs=1e-6)
    assert f.history[-1] < {1: 0.7, 4: 0.14, 8: 0.05}[bits]
    if kv == 0:
        # no V steps: the reconstruction is U alone, and the transform plays no part
        other = kashin_decode(f.codes, f.coeffs, ku, kv, "dct" if transform == "hadamard" else "hadamard", 99)
        assert torch.equal(x_hat, other)
        assert torch.equal(f.codes, kashin_decompose(x, ku, kv, transform, seed=123).codes)


@pytest.mark.parametrize("ku,kv", [(2, 2), (4, 0), (0, 4), (4, 4)])
def test_zero_rows_stay_zero(ku, kv):
    x = _gaussian(4, 64, seed=0)
    x[0] = 0.0
    x[2] = 0.0
    f = kashin_decompose(x, ku, kv, "dct", seed=0)
    x_hat = kashin_decode(f.codes, f.coeffs, ku, kv, "dct", 0)
    assert torch.isfinite(x_hat).all() and torch.isfinite(f.coeffs).all()
    assert torch.equal(x_hat[[0, 2]], torch.zeros(2, 64))
    assert all(math.isfinite(e) for e in f.history)
    zero = kashin_decompose(torch.zeros(3, 64), ku, kv, "hadamard")
    assert torch.equal(kashin_decode(zero.codes, zero.coeffs, ku, kv, "hadamard", 0), torch.zeros(3, 64))
    assert all(math.isfinite(e) for e in zero.history)


def test_constant_rows_are_finite():
    x = torch.ones(3, 64)
    x[1] *= -2.5
    f = kashin_decompose(x, 2, 2, "dct")
    x_hat = kashin_decode(f.codes, f.coeffs, 2, 2, "dct", 0)
    assert torch.isfinite(x_hat).all()
    assert _rel_error(x, x_hat) < 0.05  # one U level reproduces a constant row


@pytest.mark.parametrize("ku,kv", [(-1, 3), (3, -1), (0, 0), (5, 4), (9, 0), (0, 9)])
def test_invalid_steps_raise(ku, kv):
    with pytest.raises(ValueError):
        kashin_decompose(_gaussian(2, 16, 0), ku, kv)


def test_non_2d_input_raises():
    with pytest.raises(ValueError):
        kashin_decompose(torch.randn(16), 2, 2)
    with pytest.raises(ValueError):
        kashin_decompose(torch.randn(2, 2, 16), 2, 2)


def test_deterministic():
    x = _gaussian(4, 96, seed=9)
    a = kashin_decompose(x, 2, 2, "hadamard", seed=4)
    b = kashin_decompose(x, 2, 2, "hadamard", seed=4)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.coeffs, b.coeffs) and a.history == b.history


@pytest.mark.parametrize("ku, kv, tied, sweeps", [(3, 1, 2, 6), (3, 1, 3, 6), (5, 2, 4, 2), (3, 1, 2, 0)])
def test_tied_steps_double_exactly_and_cost_little(ku, kv, tied, sweeps):
    """The last ``tied`` u planes store one coefficient doubling from plane to plane, exactly in float16 (so a
    kernel may read their bits as one integer), also without sweeps; tying the two smallest of three u steps
    costs little against free coefficients (Gaussian rows: relative error within 2%)."""
    x = _gaussian(32, 256, seed=7)
    f = kashin_decompose(x, ku, kv, "dct", sweeps=sweeps, tied=tied)
    c, base = f.coeffs.float(), ku - tied
    for j in range(1, tied):
        assert torch.equal(c[:, base + j], c[:, base] * 2 ** j)
    if base:  # the free step is free
        assert not torch.equal(c[:, base - 1], c[:, base] * 2 ** tied)
    x_hat = kashin_decode(f.codes, f.coeffs, ku, kv, "dct", 0)
    assert f.history[-1] == pytest.approx(_rel_error(x, x_hat), rel=1e-4, abs=1e-6)
    free = kashin_decompose(x, ku, kv, "dct", sweeps=sweeps)
    if tied == 2 and sweeps:
        assert f.history[-1] < 1.02 * free.history[-1]


def test_tied_steps_out_of_range_raise():
    with pytest.raises(ValueError, match="tied"):
        kashin_decompose(_gaussian(2, 96, 0), 3, 1, tied=4)


def test_zero_sweeps_is_greedy_only():
    x = _gaussian(8, 96, seed=2)
    f0 = kashin_decompose(x, 2, 2, "dct", sweeps=0)
    f6 = kashin_decompose(x, 2, 2, "dct", sweeps=6)
    assert len(f0.history) == 2 and len(f6.history) == 8
    assert f6.history[-1] < f0.history[-1]


def test_decode_matches_u_plus_q_v():
    ku, kv = 2, 2
    x = _gaussian(5, 96, seed=6)
    f = kashin_decompose(x, ku, kv, "dct", seed=3)
    u, v = _factors(f, ku, kv)
    x_hat = kashin_decode(f.codes, f.coeffs, ku, kv, "dct", 3)
    assert_close(forward_transform(x_hat - u, "dct", 3), v, rtol=0, atol=1e-5)


def test_sign_table_and_levels():
    table = sign_table(3)
    assert table.shape == (8, 3)
    assert table[0].tolist() == [-1, -1, -1] and table[5].tolist() == [1, -1, 1]
    levels = factor_levels(torch.tensor([[1.0, 2.0, 4.0]]), 3)
    assert levels.tolist() == [[-7, -5, -3, -1, 1, 3, 5, 7]]
    assert sign_table(0).shape == (1, 0)


def test_nearest_level():
    levels = torch.tensor([[3.0, -1.0, 1.0, -3.0]])
    target = torch.tensor([[-5.0, -2.1, -0.1, 0.4, 1.9, 2.2, 9.0]])
    idx = nearest_level(target, levels)
    assert levels.gather(-1, idx).tolist() == [[-3.0, -3.0, -1.0, 1.0, 1.0, 3.0, 3.0]]


def _edge_targets(levels: torch.Tensor, g: int, seed: int) -> torch.Tensor:
    """Random entries, plus entries exactly on every level, exactly halfway between neighbours, and -0.0."""
    target = torch.randn(levels.shape[0], g, generator=torch.Generator().manual_seed(seed)) * 0.15
    s = levels.sort(dim=-1).values
    n = s.shape[1]
    target[:, :n] = s
    if n > 1:
        target[:, n:2 * n - 1] = (s[:, 1:] + s[:, :-1]) / 2
    target[:, -1] = -0.0
    return target


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("by_comparison", [True, False])
def test_nearest_level_picks_the_nearest_and_the_lower_of_two(k, by_comparison):
    """Both ways of counting the levels below an entry (comparisons, the CPU's; binary search, the GPU's) give the
    nearest level, the lower of two equally near, on levels that repeat or all coincide."""
    from quantune.kashin import _nearest_sorted, _winner_index

    c = torch.rand(4, k, generator=torch.Generator().manual_seed(k)) * 0.1
    if k:
        c[0] = 0.0  # all levels equal
    if k > 1:
        c[1, 1] = c[1, 0]  # repeated levels
    levels = factor_levels(c, k) if k else torch.zeros(4, 1)
    target = _edge_targets(levels, 300, seed=k)
    cond, pos, order, value = _nearest_sorted(target, levels, by_comparison=by_comparison)
    idx = _winner_index(cond, pos, order)
    assert torch.equal(levels.gather(-1, idx), value)
    dist = (target[..., None] - levels[:, None, :]).abs()  # (B, g, L)
    best = dist.min(-1).values
    nearest = torch.where(dist == best[..., None], levels[:, None, :], torch.inf).min(-1).values  # lowest of ties
    assert torch.equal(value, nearest)
    other = _nearest_sorted(target, levels, by_comparison=not by_comparison)
    assert torch.equal(_winner_index(other[0], other[1], other[2]), idx)  # the same indices, not only values


@pytest.mark.parametrize("ku,kv,tied", [(3, 1, 0), (1, 1, 0), (2, 2, 0), (1, 3, 0), (4, 4, 0), (3, 1, 2), (2, 0, 0),
                                        (0, 2, 0)])
def test_refit_from_per_code_sums_equals_the_refit_from_signs(ku, kv, tied):
    """The CPU's refit (per-code sums) solves the same normal equations as the signs' refit (the GPU's)."""
    from quantune.kashin import _refit, _refit_by_level

    b, g = 40, 96
    gen = torch.Generator().manual_seed(ku * 10 + kv)
    x = torch.randn(b, g, generator=gen)
    xt = forward_transform(x, "dct", 3)
    iu = torch.randint(0, 1 << ku, (b, g), generator=gen)
    iv = torch.randint(0, 1 << kv, (b, g), generator=gen)
    want_c, want_fit = _refit(x, xt, sign_table(ku)[iu], sign_table(kv)[iv], "dct", 3, tied)
    got_c, got_fit = _refit_by_level(x, xt, iu, iv, ku, kv, "dct", 3, tied)
    assert_close(got_c, want_c, rtol=1e-5, atol=1e-6)
    assert_close(got_fit, want_fit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ku,kv,tied,transform", [(3, 1, 0, "dct"), (1, 1, 0, "hadamard"), (3, 1, 2, "dct"),
                                                   (2, 2, 0, "dct")])
def test_the_fit_by_per_code_sums_is_the_fit_by_signs(monkeypatch, ku, kv, tied, transform):
    """Whole decompositions either way (REFIT_BY_LEVEL): the same error history to float rounding and all but a
    few near-tied codes the same."""
    import quantune.kashin as kashin

    x = _gaussian(64, 576, seed=5)
    x[:, 7] *= 20  # an outlier column
    runs = []
    for by_level in (True, False):
        monkeypatch.setattr(kashin, "REFIT_BY_LEVEL", by_level)
        runs.append(kashin_decompose(x, ku, kv, transform, seed=1, tied=tied))
    a, b = runs
    assert a.history == pytest.approx(b.history, rel=1e-5)
    assert (a.codes != b.codes).float().mean() < 1e-3
    assert_close(a.coeffs.float(), b.coeffs.float(), rtol=2e-3, atol=1e-6)
