"""Seeded orthogonal transforms: orthogonality, inverses, the DCT itself, seeds, batching."""
import math

import pytest
import torch
from torch.testing import assert_close

from quantune.transforms import (TRANSFORMS, dct_ortho, forward_transform, hadamard_block_size, idct_ortho,
                                 inverse_transform, random_signs)

LENGTHS = [1, 2, 3, 64, 96, 576, 1000, 1536]
F64 = dict(rtol=0, atol=1e-12)




def _q_transpose(kind: str, n: int, seed: int) -> torch.Tensor:
    """Dense ``Q^T`` (float64): column ``j`` is ``Q^T e_j``."""
    eye = torch.eye(n, dtype=torch.float64)
    return forward_transform(eye, kind, seed).T


def _dense_dct(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C[k, j] = a_k cos(pi (2j + 1) k / (2n))``, built in float64."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    # reduce the angle's integer part exactly before cos to keep float64 accuracy for large n
    num = ((2 * j + 1) * k) % (4 * n)
    c = torch.cos(math.pi * num / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", LENGTHS)
def test_forward_is_orthogonal(kind, n):
    qt = _q_transpose(kind, n, seed=3)
    assert_close(qt.T @ qt, torch.eye(n, dtype=torch.float64), **F64)  # square, so also Q Q^T = I


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", LENGTHS)
def test_inverse_undoes_forward(kind, n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert_close(inverse_transform(forward_transform(x, kind, 11), kind, 11), x, **F64)
    assert_close(forward_transform(inverse_transform(x, kind, 11), kind, 11), x, **F64)


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", [1, 3, 96, 576])
def test_inverse_is_the_transpose(kind, n):
    """``inverse_transform`` applies ``Q``: its dense matrix is the transpose of the forward one."""
    q = inverse_transform(torch.eye(n, dtype=torch.float64), kind, 5).T
    assert_close(q, _q_transpose(kind, n, 5).T, **F64)


@pytest.mark.parametrize("n", LENGTHS + [5, 7])
def test_dct_ortho_matches_dense_dct_ii(n):
    c = _dense_dct(n)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert_close(dct_ortho(x), x @ c.T, rtol=0, atol=1e-11)
    assert_close(idct_ortho(x), x @ c, rtol=0, atol=1e-11)


@pytest.mark.parametrize("n", [1, 5, 64, 576])
def test_dct_transform_is_dct_of_sign_flipped_input(n):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    signs = random_signs(n, 9, dtype=torch.float64)
    assert_close(forward_transform(x, "dct", 9), (x * signs) @ _dense_dct(n).T, rtol=0, atol=1e-11)


@pytest.mark.parametrize("n,block", [(1, 1), (3, 1), (64, 64), (96, 32), (576, 64), (1000, 8), (1536, 512)])
def test_hadamard_block_size(n, block):
    assert hadamard_block_size(n) == block


def test_hadamard_matches_sylvester_blocks():
    n, block = 96, 32
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    dense = torch.block_diag(*[h / math.sqrt(block)] * (n // block))
    signs = random_signs(n, 4, dtype=torch.float64)
    assert_close(_q_transpose("hadamard", n, 4), dense @ torch.diag(signs), **F64)


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", [64, 96, 576, 1000])
def test_seed_determines_the_transform(kind, n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(forward_transform(x, kind, 7), forward_transform(x, kind, 7))
    assert torch.equal(random_signs(n, 7), random_signs(n, 7))
    other = forward_transform(x, kind, 8)
    assert (other - forward_transform(x, kind, 7)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", [3, 96, 576])
def test_batched_over_leading_dims(kind, n):
    x = torch.randn(2, 3, 4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = forward_transform(x, kind, 1)
    assert y.shape == x.shape
    assert_close(y, forward_transform(x.reshape(-1, n), kind, 1).reshape(x.shape), **F64)
    assert_close(y[1, 2, 3], forward_transform(x[1, 2, 3], kind, 1), **F64)
    assert_close(inverse_transform(y, kind, 1), x, **F64)


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", LENGTHS)
def test_float32_accuracy(kind, n):
    x64 = torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n + 1))
    y32 = forward_transform(x64.float(), kind, 2)
    assert y32.dtype == torch.float32
    assert_close(y32.double(), forward_transform(x64, kind, 2), rtol=0, atol=2e-5)
    assert_close(inverse_transform(y32, kind, 2).double(), x64, rtol=0, atol=2e-5)
    # norm preserved to float32 precision
    assert_close(y32.norm(dim=-1), x64.float().norm(dim=-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_half_precision_keeps_dtype(kind):
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    y = forward_transform(x.half(), kind, 0)
    assert y.dtype == torch.float16
    assert_close(y.float(), forward_transform(x, kind, 0), rtol=0, atol=2e-2)


def test_unknown_kind_raises():
    with pytest.raises(ValueError):
        forward_transform(torch.zeros(4), "fft", 0)
    with pytest.raises(ValueError):
        inverse_transform(torch.zeros(4), "fft", 0)


def test_random_signs_are_plus_minus_one_and_balanced():
    s = random_signs(4096, 0)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(s.sum())) < 4 * math.sqrt(4096)  # ~4 sigma of a fair +-1 walk
