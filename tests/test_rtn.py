"""Round-to-nearest: half-step error bounds, exact grid round trips, groups, per-channel."""
import pytest
import torch

from quantune.rtn import rtn_dequantize, rtn_quantize

FP16_HALF_ULP = 2.0 ** -11  # relative rounding of a float16 scale or minimum


def _weights(m: int, n: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * scale


def _group_max(t: torch.Tensor, group: int) -> torch.Tensor:
    m, n = t.shape
    return t.reshape(m, n // group, group).amax(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [8, 32, 96, 576])
def test_symmetric_error_is_at_most_half_a_step(bits, group):
    w = _weights(16, 576, seed=bits + group)
    codes, scales, mins = rtn_quantize(w, bits, group, symmetric=True)
    assert mins is None
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert scales.dtype == torch.float16 and scales.shape == (16, 576 // group)
    # GPTQ-style grid: max|w| sits at (2**b - 1) / 2 steps, so both end codes are in use
    assert int(codes.min()) == 0 and int(codes.max()) == (1 << bits) - 1
    err = _group_max((rtn_dequantize(codes, scales, None, bits) - w).abs(), group)
    step = scales.float()
    # half a step everywhere (the clipped largest positive weight also lands half a step away),
    # plus float16 rounding of the scale, which moves max|w| by at most 2**-11 of itself
    allowance = FP16_HALF_ULP * _group_max(w.abs(), group)
    assert (err <= step / 2 * (1 + 1e-4) + allowance).all(), float((err / step).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [8, 32, 96, 576])
def test_asymmetric_error_is_at_most_half_a_step(bits, group):
    w = _weights(16, 576, seed=bits * group) + 0.01  # off-centre, where asymmetric matters
    codes, scales, mins = rtn_quantize(w, bits, group, symmetric=False)
    assert mins.dtype == torch.float16 and mins.shape == scales.shape == (16, 576 // group)
    assert int(codes.max()) < 1 << bits
    err = _group_max((rtn_dequantize(codes, scales, mins, bits) - w).abs(), group)
    step = scales.float()
    wg = w.reshape(16, -1, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    # half a step, plus what float16 rounding of the stored minimum and scale can move the ends
    # of the grid: at most 2**-11 * (|min| + range)
    allowance = FP16_HALF_ULP * (lo.abs() + (hi - lo))
    assert (err <= step / 2 * (1 + 1e-4) + allowance).all()
    # for these well-scaled weights the plain half-step bound holds too (measured ratio <= 1.0000)
    assert (err <= step / 2 * (1 + 1e-3)).all(), float((err / step).max())


def test_symmetric_grid_by_hand():
    """2 bits, one group: s = 2 * 1.0 / 3; q = round(w / s) clamped to [-2, 1]; codes q + 2."""
    w = torch.tensor([[-1.0, 0.5, 0.0, 1.0]])
    codes, scales, _ = rtn_quantize(w, 2, 4, symmetric=True)
    s = torch.tensor(2 / 3).half().float()
    assert torch.equal(scales, s.half().reshape(1, 1))
    assert codes.tolist() == [[0, 3, 2, 3]]  # -1.5 -> -2, 0.75 -> 1, 0 -> 0, 1.5 -> 2 clipped to 1
    assert torch.equal(rtn_dequantize(codes, scales, None, 2), torch.tensor([[-2.0, 1.0, 0.0, 1.0]]) * s)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_grid_weights_round_trip_exactly(bits):
    qmax = (1 << bits) - 1
    step = 2.0 ** -7
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, qmax + 1, (6, 64), generator=gen).float()
    q[:, 0::16] = 0
    q[:, 1::16] = qmax  # every group spans the whole grid
    offsets = torch.tensor([-0.5, -0.25, 0.125, 1.0]).repeat_interleave(16)  # float16-exact minima
    w = q * step + offsets
    codes, scales, mins = rtn_quantize(w, bits, 16, symmetric=False)
    assert torch.equal(mins, offsets[::16].half().expand(6, 4))
    assert torch.equal(scales, torch.full((6, 4), step, dtype=torch.float16))
    assert torch.equal(codes, q.to(torch.uint8))
    assert torch.equal(rtn_dequantize(codes, scales, mins, bits), w)


@pytest.mark.parametrize("symmetric", [True, False])
def test_groups_are_independent(symmetric):
    w = _weights(4, 128, seed=0)
    codes, scales, mins = rtn_quantize(w, 4, 32, symmetric)
    w2 = w.clone()
    w2[:, 32:64] *= 10.0  # change one group only
    codes2, scales2, mins2 = rtn_quantize(w2, 4, 32, symmetric)
    keep = torch.ones(128, dtype=torch.bool)
    keep[32:64] = False
    assert torch.equal(codes[:, keep], codes2[:, keep])
    assert torch.equal(scales[:, [0, 2, 3]], scales2[:, [0, 2, 3]])
    assert not torch.equal(scales[:, 1], scales2[:, 1])


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_is_one_group_per_row(symmetric):
    w = _weights(8, 576, seed=1)
    codes, scales, mins = rtn_quantize(w, 4, 576, symmetric)
    assert scales.shape == (8, 1)
    if symmetric:
        assert torch.equal(scales, (2 * w.abs().amax(1, keepdim=True) / 15).half())
    else:
        assert torch.equal(mins, w.amin(1, keepdim=True).half())
    err = (rtn_dequantize(codes, scales, mins, 4) - w).abs().amax(1, keepdim=True)
    assert (err <= scales.float() / 2 * (1 + 1e-3) + FP16_HALF_ULP * w.abs().amax(1, keepdim=True)).all()


def test_smaller_groups_lower_error():
    w = _weights(16, 576, seed=3)
    errs = []
    for group in (576, 96, 32, 8):
        codes, scales, _ = rtn_quantize(w, 3, group, symmetric=True)
        errs.append(float((rtn_dequantize(codes, scales, None, 3) - w).norm() / w.norm()))
    assert errs == sorted(errs, reverse=True), errs


def test_asymmetric_beats_symmetric_on_one_sided_weights():
    w = torch.rand(16, 128, generator=torch.Generator().manual_seed(0))  # all in [0, 1)
    sym = rtn_dequantize(*rtn_quantize(w, 3, 32, True), 3)
    asym = rtn_dequantize(*rtn_quantize(w, 3, 32, False), 3)
    assert (asym - w).norm() < 0.6 * (sym - w).norm()


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_group_decodes_to_zero(symmetric):
    w = _weights(2, 64, seed=4)
    w[0, :32] = 0.0
    codes, scales, mins = rtn_quantize(w, 4, 32, symmetric)
    w_hat = rtn_dequantize(codes, scales, mins, 4)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[0, :32], torch.zeros(32))


def test_width_not_divisible_by_group_is_rejected():
    with pytest.raises(AssertionError):
        rtn_quantize(torch.zeros(2, 100), 4, 32, True)
