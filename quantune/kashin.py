"""Overdetermined-basis ("Kashin") decomposition with sign-step codebooks.

Every vector ``x`` (a weight row, or a segment of one) of length ``g`` is written in the
frame ``[I, Q]`` with a seeded fast orthogonal ``Q`` (see :mod:`quantune.transforms`)::

    x ~= u + Q v,    u = sum_{t<ku} c_t s_t,    v = sum_{t<kv} d_t sigma_t,

with sign vectors ``s_t, sigma_t`` in {-1, +1}^g and per-vector coefficients ``c, d``
(Kashin 1977; Merkulov et al., arXiv 2404.09737; the fixed u/v step blocks follow the
authors' structured-transform follow-up). Because every entry of ``u`` is one of the
``2**ku`` sums ``+-c_1 +- ... +- c_ku`` (and likewise for ``v``), the ``ku + kv`` sign bits
at one position form a single ``b = ku + kv`` bit code that decodes both factors through
the per-vector codebook::

    C[idx] = (sum_t c_t (2 bit_t(idx) - 1),  sum_t d_t (2 bit_{ku+t}(idx) - 1)).

The fit:
1. greedy sign steps (``ku`` on ``u`` then ``kv`` on ``v``), each removing
   ``mean|r| * sign(r)`` from the residual in its own basis;
2. ``sweeps`` rounds of exact block-coordinate descent: since ``Q`` is orthogonal,
   ``||x - u - Qv|| = ||Q^T (x - u) - v||``, so with the other factor fixed the best code
   of each entry is the nearest codebook level; then a joint least-squares refit of the
   ``ku + kv`` coefficients of every vector.
The objective never increases, and its value after each sweep is returned as the
convergence history. Coefficients are stored in float16 and the codes are re-fitted to the
rounded coefficients, so the recorded error is the error of the stored format.

Tied steps (``tied``, QuantConfig.tied_steps): the ``tied`` smallest u steps may share one
coefficient that doubles from step to step, stored as the last u planes smallest first
(``c_{t+1} = 2 c_t``, exact in float16). Their ``2**tied`` sums then lie on a uniform grid
and their bits decode as one integer, so the GPU's few-token kernel reads them as one plane
instead of one each. The least-squares refit solves for the shared coefficient (the normal
equations through :func:`tie_matrix`); nothing else changes, and the stored format is the
same (any reader decodes it; the kernels find the doubling in the stored values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantune.transforms import forward_transform, inverse_transform

# The sweeps' refit from per-code sums (_refit_by_level) or from the signs (_refit); None: per-code sums on the CPU,
# where they are faster, and the signs elsewhere (the GPU's scatter_add adds in no fixed order, and the per-code
# sums are untimed there).
REFIT_BY_LEVEL: bool | None = None
# How _nearest_sorted counts the sorted levels below each entry: one comparison per level (True) or torch's binary
# search (False); None: comparisons on the CPU. Both give the same integers.
NEAREST_BY_COMPARISON: bool | None = None


@dataclass
class KashinFactors:
    codes: torch.Tensor  # (B, g) uint8, low ku bits -> u signs, high kv bits -> v signs
    coeffs: torch.Tensor  # (B, ku + kv) float16: c_1..c_ku, d_1..d_kv
    history: list[float]  # relative Frobenius error after init and after every sweep


def sign_table(k: int, device=None) -> torch.Tensor:
    """``(2**k, k)`` matrix of +-1: row ``i`` holds ``2 * bit_t(i) - 1`` in column ``t``."""
    idx = torch.arange(1 << k, device=device)
    bits = (idx[:, None] >> torch.arange(k, device=device)) & 1
    return (bits * 2 - 1).float()


def factor_levels(coeffs: torch.Tensor, k: int) -> torch.Tensor:
    """Levels ``(B, 2**k)`` of a factor with coefficients ``(B, k)``: ``level[i] = table[i] @ c``."""
    return coeffs @ sign_table(k, coeffs.device).to(coeffs.dtype).T


def _nearest_sorted(target: torch.Tensor, levels: torch.Tensor, by_comparison: bool | None = None):
    """The nearest of each row's levels, as ``(cond, pos, order, value)``: ``pos`` counts the sorted
    levels below each entry (``searchsorted``'s left side), its neighbours are ``lo = pos - 1`` and ``hi = pos``
    (clamped), ``cond`` is True where ``lo`` wins (also on a tie), ``value`` the winner's value.

    The neighbours come from tables padded at both ends, so no index is clamped, and the value is picked from the
    two neighbours, not gathered again. On the CPU ``pos`` is counted with one comparison per level, the same
    integers as ``searchsorted``'s binary search. 2-core CPU, 1536 x 576 entries, against the clamped gathers
    before: 11.7 -> 5.0 ms at 2 levels, 12.8 -> 7.8 at 8 (binary search with the padded tables: 6.7 and 10.9).
    ``by_comparison``: count by comparisons (True) or binary search (False); None: by comparisons on the CPU."""
    lvl = levels.shape[-1]
    sorted_levels, order = levels.sort(dim=-1)
    if by_comparison is None:
        by_comparison = NEAREST_BY_COMPARISON
    if by_comparison is None:
        by_comparison = target.device.type == "cpu" and lvl <= 32
    if by_comparison:
        count = torch.zeros(target.shape, dtype=torch.uint8 if lvl < 256 else torch.int32, device=target.device)
        for j in range(lvl):
            count += sorted_levels[:, j:j + 1] < target
        pos = count.long()
    else:
        pos = torch.searchsorted(sorted_levels.contiguous(), target.contiguous())
    s_lo = torch.cat((sorted_levels[:, :1], sorted_levels), -1).gather(-1, pos)  # sorted[max(pos - 1, 0)]
    s_hi = torch.cat((sorted_levels, sorted_levels[:, -1:]), -1).gather(-1, pos)  # sorted[min(pos, L - 1)]
    cond = (target - s_lo).abs() <= (s_hi - target).abs()
    return cond, pos, order, torch.where(cond, s_lo, s_hi)


def _winner_index(cond: torch.Tensor, pos: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The winning level's index before sorting: ``order[lo]`` where ``cond``, else ``order[hi]``."""
    lvl = order.shape[-1]
    table = torch.cat((order[:, :1], order, order, order[:, -1:]), -1)  # [order[lo] by pos | order[hi] by pos]
    return table.gather(-1, pos + (lvl + 1) * (~cond))


def nearest_level(target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index ``(B, g)`` of the level ``(B, L)`` nearest each entry of ``target`` ``(B, g)`` (of two equally near,
    the lower)."""
    return nearest_level_values(target, levels)[0]


def _signs_of(codes: torch.Tensor, first_bit: int, k: int) -> torch.Tensor:
    """``(B, g, k)`` +-1 signs stored in bits ``first_bit .. first_bit + k - 1`` of codes."""
    shifts = torch.arange(first_bit, first_bit + k, device=codes.device)
    return (((codes.long().unsqueeze(-1) >> shifts) & 1) * 2 - 1).float()


def kashin_factors(codes: torch.Tensor, coeffs: torch.Tensor, ku: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors ``(u, v)``, each ``(B, g)``, that codes and coefficients decode to.

    ``u`` lives in the weight domain and ``v`` in the transformed domain: ``x_hat = u + Q v``.
    """
    assert codes.dim() == 2 and coeffs.shape == (codes.shape[0], ku + kv), (codes.shape, coeffs.shape)
    c = coeffs.float()
    idx = codes.long()
    zeros = torch.zeros(codes.shape, device=codes.device)
    u = factor_levels(c[:, :ku], ku).gather(-1, idx & ((1 << ku) - 1)) if ku else zeros
    v = factor_levels(c[:, ku:], kv).gather(-1, idx >> ku) if kv else zeros
    return u, v


def kashin_decode(codes: torch.Tensor, coeffs: torch.Tensor, ku: int, kv: int,
                  transform: str, seed: int) -> torch.Tensor:
    """Rebuild vectors ``(B, g)`` from codes ``(B, g)`` and coefficients ``(B, ku + kv)``."""
    u, v = kashin_factors(codes, coeffs, ku, kv)
    return u + inverse_transform(v, transform, seed) if kv else u


def _sign_gram(s: torch.Tensor) -> torch.Tensor:
    """``<s_i, s_j>`` ``(B, k, k)`` of +-1 vectors ``s`` ``(B, g, k)``: ``g`` on the diagonal, the
    rest from elementwise products (exact integers; a batched GEMM with 3 x 3 outputs is slow)."""
    b, g, k = s.shape
    gram = torch.full((b, k, k), float(g), dtype=torch.float64, device=s.device)
    for i in range(k):
        for j in range(i + 1, k):
            gram[:, i, j] = gram[:, j, i] = (s[..., i] * s[..., j]).sum(-1).double()
    return gram


def tie_matrix(ku: int, kv: int, tied: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """``(ku + kv, ku + kv - tied + 1)``: the coefficients as a product with the free parameters, where the last
    ``tied`` u steps share one, doubling from step to step (``c_{t+1} = 2 c_t``); the identity for ``tied < 2``."""
    tied = tied if tied >= 2 else 0
    free = ku - tied
    m = torch.zeros(ku + kv, ku + kv - max(tied - 1, 0), dtype=dtype, device=device)
    for t in range(free):
        m[t, t] = 1
    for j in range(tied):
        m[free + j, free] = 2.0 ** j
    for j in range(kv):
        m[ku + j, m.shape[1] - kv + j] = 1
    return m


def _refit(x: torch.Tensor, xt: torch.Tensor, su: torch.Tensor, sv: torch.Tensor,
           transform: str, seed: int, tied: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coefficients ``(B, ku+kv)`` for fixed signs, and the squared norm each
    vector's fit removes (``||x||^2`` minus it is the squared residual).

    Columns of the design matrix: ``s_t`` (``u`` steps) and ``Q sigma_t`` (``v`` steps);
    Gram entries use ``<s, Q sigma> = <Q^T s, sigma>`` and ``<Q sigma, Q sigma'> = <sigma, sigma'>``.
    ``tied`` >= 2: the last ``tied`` u coefficients are fitted as one, ``c_{t+1} = 2 c_t`` (:func:`tie_matrix`).
    """
    ku, kv = su.shape[-1], sv.shape[-1]
    blocks_r = []
    if ku:
        blocks_r.append(torch.einsum("bgk,bg->bk", su, x))
    if kv:
        blocks_r.append(torch.einsum("bgk,bg->bk", sv, xt))
    rhs = torch.cat(blocks_r, dim=-1).double()
    gram = torch.zeros(x.shape[0], ku + kv, ku + kv, dtype=torch.float64, device=x.device)
    if ku:
        gram[:, :ku, :ku] = _sign_gram(su)
    if kv:
        gram[:, ku:, ku:] = _sign_gram(sv)
    if ku and kv:  # <s, Q sigma> = <Q^T s, sigma>: transform whichever side has fewer vectors
        if kv <= ku:
            sv_q = inverse_transform(sv.transpose(1, 2), transform, seed)  # (B, kv, g) = Q sigma
            cross = torch.einsum("bgk,bjg->bkj", su, sv_q).double()
        else:
            su_t = forward_transform(su.transpose(1, 2), transform, seed)  # (B, ku, g) = Q^T s
            cross = torch.einsum("bkg,bgj->bkj", su_t, sv).double()
        gram[:, :ku, ku:] = cross
        gram[:, ku:, :ku] = cross.transpose(1, 2)
    return _solve(rhs, gram, ku, kv, tied)


def _level_sums(idx: torch.Tensor, src: torch.Tensor, levels: int) -> torch.Tensor:
    """``(B, levels)``: the sum of each row's entries of ``src`` ``(B, g)`` per code ``idx`` ``(B, g)``, in float64."""
    return src.new_zeros(src.shape[0], levels).scatter_add_(1, idx, src).double()


def _refit_by_level(x: torch.Tensor, xt: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor, ku: int, kv: int,
                    transform: str, seed: int, tied: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_refit` from the codes ``iu``, ``iv`` ``(B, g)`` (level indices, ``s = table[idx]``) instead of the
    signs: every entry with one code has the same signs, so the normal equations need only per-code sums,
    ``<s_t, x> = sum_l table[l, t] sum_{idx = l} x`` and ``<s_i, s_j> = sum_l table[l, i] table[l, j] count_l``
    (and the cross terms from the per-code sums of ``Q sigma`` or ``Q^T s``). One ``scatter_add`` pass per sum
    replaces the signs' ``(B, g, k)`` tensors, their pairwise products and the batched products with ``k``
    outputs. The refit alone is barely faster (2-core CPU, 1536 x 576: 15.5 -> 14.0 ms at ku = 3, kv = 1); the
    gain is that the sweeps then rebuild the factors from level tables and codes and never form the signs (whole
    decomposition 316 -> 260 ms there). ``scatter_add`` adds in an order the GPU does not fix (atomics), so the fit
    uses this on the CPU only; the two agree to float32 rounding (tested)."""
    su_table, sv_table = sign_table(ku, x.device), sign_table(kv, x.device)
    tu, tv = su_table.double(), sv_table.double()
    nu, nv = 1 << ku, 1 << kv
    ones = torch.ones_like(x)
    rhs = torch.cat((_level_sums(iu, x, nu) @ tu, _level_sums(iv, xt, nv) @ tv), dim=-1)
    gram = torch.zeros(x.shape[0], ku + kv, ku + kv, dtype=torch.float64, device=x.device)
    gram[:, :ku, :ku] = torch.einsum("li,bl,lj->bij", tu, _level_sums(iu, ones, nu), tu)
    gram[:, ku:, ku:] = torch.einsum("li,bl,lj->bij", tv, _level_sums(iv, ones, nv), tv)
    if ku and kv:  # <s, Q sigma> = <Q^T s, sigma>: transform whichever side has fewer vectors
        if kv <= ku:
            sv_q = inverse_transform(sv_table[iv].transpose(1, 2), transform, seed)  # (B, kv, g) = Q sigma
            cross = torch.stack([_level_sums(iu, sv_q[:, j], nu) @ tu for j in range(kv)], dim=-1)
        else:
            su_t = forward_transform(su_table[iu].transpose(1, 2), transform, seed)  # (B, ku, g) = Q^T s
            cross = torch.stack([_level_sums(iv, su_t[:, i], nv) @ tv for i in range(ku)], dim=1)
        gram[:, :ku, ku:] = cross
        gram[:, ku:, :ku] = cross.transpose(1, 2)
    return _solve(rhs, gram, ku, kv, tied)


def _solve(rhs: torch.Tensor, gram: torch.Tensor, ku: int, kv: int, tied: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations ``gram c = rhs`` (float64, ``(B, k, k)`` and ``(B, k)``), tied steps kept tied: the
    coefficients in float32 and the squared norm each vector's fit removes."""
    tie = tie_matrix(ku, kv, tied, device=rhs.device)
    gram_p, rhs_p = tie.T @ gram @ tie, rhs @ tie  # the normal equations in the free parameters
    ridge = 1e-9 * gram_p.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-30)
    eye = torch.eye(tie.shape[1], dtype=gram.dtype, device=rhs.device)
    coeffs = torch.linalg.solve(gram_p + ridge[:, None, None] * eye, rhs_p) @ tie.T
    # squared residual of the fit, per vector: ||x||^2 - 2 c.rhs + c^T G c (no transform needed)
    fit = (coeffs * rhs).sum(-1) * 2 - torch.einsum("bi,bij,bj->b", coeffs, gram, coeffs)
    return coeffs.float(), fit


def nearest_level_values(target: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_level`'s index ``(B, g)`` and the level's value there."""
    cond, pos, order, value = _nearest_sorted(target, levels)
    return _winner_index(cond, pos, order), value


def kashin_decompose(x: torch.Tensor, ku: int, kv: int, transform: str = "dct",
                     seed: int = 0, sweeps: int = 6, tied: int = 0, nearest=None) -> KashinFactors:
    """Decompose every row of ``x`` ``(B, g)``; see the module docstring for the math. ``tied`` >= 2: the
    ``tied`` smallest u steps share one coefficient, doubling from plane to plane (stored as the last u planes,
    smallest first: ``c_{t+1} = 2 c_t`` exactly in float16), so their bits read as one integer field.
    ``nearest``: what assigns the codes, ``(target, levels) -> (index, value)`` with :func:`nearest_level_values`'s
    results (default: it; :mod:`quantune.fit_kernels` has a GPU kernel with the same results)."""
    nearest = nearest or nearest_level_values
    if x.dim() != 2:
        raise ValueError(f"kashin_decompose expects (B, g) vectors, got shape {tuple(x.shape)}")
    if ku < 0 or kv < 0 or not 1 <= ku + kv <= 8:
        raise ValueError(f"need 1 <= ku + kv <= 8 sign steps, got ku={ku}, kv={kv}")
    if not 0 <= tied <= ku:
        raise ValueError(f"tied must lie in [0, ku={ku}], got {tied}")
    tied = tied if tied >= 2 else 0
    x = x.float()
    norm = x.norm().clamp(min=1e-30)
    x_sq = x.double().square().sum()
    xt = forward_transform(x, transform, seed) if kv else x

    def rel_err(u_hat, v_hat):
        resid = xt - v_hat - (forward_transform(u_hat, transform, seed) if kv else u_hat)
        return float(resid.norm() / norm)

    # 1. greedy sign steps: ku on u, then kv on v (in the transformed domain)
    r = x.clone()
    coeff_list, su_list, sv_list = [], [], []
    for _ in range(ku):
        s = torch.where(r >= 0, 1.0, -1.0)
        c = r.abs().mean(-1, keepdim=True)
        r -= c * s
        coeff_list.append(c), su_list.append(s)
    rt = forward_transform(r, transform, seed) if kv else r
    for _ in range(kv):
        s = torch.where(rt >= 0, 1.0, -1.0)
        d = rt.abs().mean(-1, keepdim=True)
        rt -= d * s
        coeff_list.append(d), sv_list.append(s)
    if tied:  # the tied run stored smallest first, so that its planes weigh 1, 2, 4, ... (an integer field)
        order = list(range(ku - tied)) + list(range(ku - 1, ku - tied - 1, -1))
        coeff_list[:ku], su_list = [coeff_list[t] for t in order], [su_list[t] for t in order]
    coeffs = torch.cat(coeff_list, dim=-1)
    su = torch.stack(su_list, -1) if ku else x.new_zeros(*x.shape, 0)
    sv = torch.stack(sv_list, -1) if kv else x.new_zeros(*x.shape, 0)
    if tied and not sweeps:  # coefficients that keep the tie (with sweeps, the first sweep's refit ties them)
        coeffs, _ = _refit(x, xt, su, sv, transform, seed, tied)
    u_hat = (su * coeffs[:, None, :ku]).sum(-1)
    v_hat = (sv * coeffs[:, None, ku:]).sum(-1)
    history = [rel_err(u_hat, v_hat)]

    table_u, table_v = sign_table(ku, x.device), sign_table(kv, x.device)

    def assign(coeffs, v_hat):
        """Best u codes given v, then best v codes given u, for fixed coefficients."""
        lev_u = coeffs[:, :ku] @ table_u.T
        target_u = x - inverse_transform(v_hat, transform, seed) if kv else x
        iu, u_hat = nearest(target_u, lev_u)
        iv = torch.zeros_like(iu)
        if kv:
            lev_v = coeffs[:, ku:] @ table_v.T
            target_v = xt - forward_transform(u_hat, transform, seed)
            iv, v_hat = nearest(target_v, lev_v)
        return iu, iv, u_hat, v_hat

    # 2. block-coordinate sweeps: codes given coefficients, then least-squares coefficients
    by_level = x.device.type == "cpu" if REFIT_BY_LEVEL is None else REFIT_BY_LEVEL
    for _ in range(sweeps):
        iu, iv, u_hat, v_hat = assign(coeffs, v_hat)
        if by_level:
            coeffs, fit = _refit_by_level(x, xt, iu, iv, ku, kv, transform, seed, tied)
            u_hat = factor_levels(coeffs[:, :ku], ku).gather(-1, iu)
            v_hat = factor_levels(coeffs[:, ku:], kv).gather(-1, iv)
        else:
            su, sv = table_u[iu], table_v[iv]
            coeffs, fit = _refit(x, xt, su, sv, transform, seed, tied)
            u_hat = (su * coeffs[:, None, :ku]).sum(-1)
            v_hat = (sv * coeffs[:, None, ku:]).sum(-1)
        history.append(float((x_sq - fit.sum()).clamp(min=0).sqrt() / norm))

    # 3. store coefficients in float16 and fit the codes to the rounded values
    coeffs16 = coeffs.half()
    if tied:  # the run from its float16 base times powers of two: exact, so the kernels can read it as one field
        base = ku - tied
        coeffs16[:, base:ku] = coeffs16[:, base:base + 1] * (2.0 ** torch.arange(tied, device=x.device)).half()
    iu, iv, u_hat, v_hat = assign(coeffs16.float(), v_hat)
    history.append(rel_err(u_hat, v_hat))
    codes = (iu | (iv << ku)).to(torch.uint8)
    return KashinFactors(codes=codes, coeffs=coeffs16, history=history)
