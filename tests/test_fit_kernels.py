"""The quantization fit's GPU kernels against the torch path they replace: bit for bit (under Triton's CPU
interpreter here, TRITON_INTERPRET=1 from conftest)."""
import pytest
import torch

from quantune.kashin import kashin_decompose, nearest_level_values


def _levels(b: int, k: int, seed: int) -> torch.Tensor:
    """kashin's levels: the 2^k sums of +-c_t per row (duplicates where coefficients tie or vanish)."""
    from quantune.kashin import factor_levels

    c = torch.rand(b, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    c[0] = 0.0  # one row of all-equal levels
    if b > 2 and k > 1:
        c[1, 1] = c[1, 0]  # a row with repeated levels
    return factor_levels(c, k)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_nearest_level_kernel_gives_the_torch_path_bit_for_bit(k):
    pytest.importorskip("triton")
    from quantune.fit_kernels import BLOCK, nearest_level

    b, g = 5, BLOCK + 476  # two blocks a row, the second partial
    levels = _levels(b, k, seed=k) if k else torch.zeros(b, 1)
    gen = torch.Generator().manual_seed(10 + k)
    target = torch.randn(b, g, generator=gen) * 0.15
    sorted_levels = levels.sort(dim=-1).values
    l = levels.shape[1]
    target[:, :l] = sorted_levels  # exactly on a level
    if l > 1:
        target[:, l:2 * l - 1] = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2  # exactly between two
    target[:, -1] = -0.0
    got_idx, got_val = nearest_level(target, levels)
    want_idx, want_val = nearest_level_values(target, levels)
    assert got_idx.dtype == want_idx.dtype == torch.int64
    assert torch.equal(got_idx, want_idx) and torch.equal(got_val, want_val)


def test_nearest_level_kernel_takes_only_what_it_serves():
    pytest.importorskip("triton")
    from quantune import fit_kernels

    target, many = torch.randn(3, 40), _levels(3, 5, seed=1)  # 32 levels: past MAX_LEVELS
    assert not fit_kernels.serves(target, many) and fit_kernels.serves(target, _levels(3, 4, seed=1))
    with pytest.raises(ValueError, match="nearest-level kernel"):
        fit_kernels.nearest_level(target, many)
    for a, b in zip(fit_kernels.nearest_or_torch(target, many), nearest_level_values(target, many)):
        assert torch.equal(a, b)  # the torch path takes what the kernel does not
    assert not fit_kernels.serves(target.double(), _levels(3, 2, seed=1).double())


@pytest.mark.parametrize("ku,kv,tied,transform", [(3, 1, 0, "dct"), (1, 1, 0, "dct"), (3, 1, 2, "hadamard"),
                                                   (2, 2, 0, "dct")])
def test_kashin_fit_with_the_kernel_is_the_torch_fit(ku, kv, tied, transform):
    """The whole decomposition with the kernel assigning the codes: the same codes, coefficients and history."""
    pytest.importorskip("triton")
    from quantune.fit_kernels import nearest_or_torch

    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(ku + 7 * kv)) * 0.02
    plain = kashin_decompose(x, ku, kv, transform, seed=3, sweeps=3, tied=tied)
    kernel = kashin_decompose(x, ku, kv, transform, seed=3, sweeps=3, tied=tied, nearest=nearest_or_torch)
    assert torch.equal(plain.codes, kernel.codes) and torch.equal(plain.coeffs, kernel.coeffs)
    assert plain.history == kernel.history


def test_the_kernel_is_used_only_on_cuda_and_when_switched_on(monkeypatch):
    from quantune import fit_kernels

    assert fit_kernels.NEAREST_KERNEL is False and fit_kernels.nearest_for("cuda") is None  # off until timed
    monkeypatch.setattr(fit_kernels, "NEAREST_KERNEL", True)
    assert fit_kernels.nearest_for("cpu") is None
    if fit_kernels.triton is not None:
        assert fit_kernels.nearest_for("cuda") is fit_kernels.nearest_or_torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits,group", [(4, None), (2, None), (3, None), (4, 128), (8, None)])
def test_kernel_fit_on_the_gpu_stores_what_the_torch_fit_stores(bits, group, monkeypatch):
    """A layer quantized on the GPU with the kernel assigning the codes and without: the same stored buffers."""
    from quantune import fit_kernels
    from quantune.config import QuantConfig
    from quantune.methods import get_method

    w = torch.randn(512, 4096, generator=torch.Generator().manual_seed(bits)).cuda() * 0.02
    cfg = QuantConfig(bits=bits, group_size=group)
    plain, _ = get_method("kashin").quantize(w, cfg)
    monkeypatch.setattr(fit_kernels, "NEAREST_KERNEL", True)
    kernel, _ = get_method("kashin").quantize(w, cfg)
    assert plain.keys() == kernel.keys() and all(torch.equal(plain[k], kernel[k]) for k in plain)
