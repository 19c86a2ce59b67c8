"""Bit packing: exact round trips at every width, sizes, and input checks."""
import pytest
import torch

from quantune.bitpack import pack_codes, packed_row_bytes, unpack_codes

SHAPES = [(1,), (7,), (8,), (9,), (13,), (576,), (1536,), (3, 1), (4, 17), (2, 576), (2, 3, 5), (2, 3, 1536)]


def _random_codes(shape, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=gen).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_exact(bits, shape):
    codes = _random_codes(shape, bits, seed=bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_row_bytes(shape[-1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_round_trip(bits):
    """All-zero and all-max codes exercise every bit of every byte."""
    for value in (0, (1 << bits) - 1):
        codes = torch.full((3, 21), value, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, 21), codes)
    full = torch.full((16,), (1 << bits) - 1, dtype=torch.uint8)
    assert torch.equal(pack_codes(full, bits), torch.full((2 * bits,), 255, dtype=torch.uint8))


@pytest.mark.parametrize("n,bits,expected", [(1, 1, 1), (8, 1, 1), (9, 1, 2), (8, 3, 3), (9, 3, 6),
                                             (576, 4, 288), (1536, 3, 576), (1, 8, 8), (0, 5, 0)])
def test_packed_row_bytes(n, bits, expected):
    assert packed_row_bytes(n, bits) == expected


def _reference_pack(row: list[int], bits: int) -> list[int]:
    """The documented layout: codes concatenated LSB first into one little-endian bit stream."""
    stream = sum(c << (i * bits) for i, c in enumerate(row))
    return list(stream.to_bytes(packed_row_bytes(len(row), bits), "little"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 8, 19])
def test_layout_matches_reference_bit_stream(bits, n):
    codes = _random_codes((3, n), bits, seed=100 + n)
    packed = pack_codes(codes, bits)
    for row, out in zip(codes.tolist(), packed.tolist()):
        assert out == _reference_pack(row, bits)


def test_layout_examples():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10000001]
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3, 0, 0, 0]


def test_empty_rows():
    codes = torch.zeros(2, 0, dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.shape == (2, 0)
    assert unpack_codes(packed, 3, 0).shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.float32])
def test_wrong_code_dtype_raises(dtype):
    with pytest.raises(TypeError):
        pack_codes(torch.zeros(8, dtype=dtype), 4)


@pytest.mark.parametrize("bits", range(1, 8))
def test_codes_too_wide_raise(bits):
    codes = torch.zeros(10, dtype=torch.uint8)
    codes[4] = 1 << bits
    with pytest.raises(ValueError):
        pack_codes(codes, bits)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, "4"])
def test_bad_width_raises(bits):
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(8, dtype=torch.uint8), bits, 8)
    with pytest.raises(ValueError):
        packed_row_bytes(8, bits)


def test_unpack_wrong_dtype_raises():
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(3, dtype=torch.int32), 3, 8)


@pytest.mark.parametrize("n,bits,nbytes", [(8, 3, 2), (8, 3, 4), (9, 3, 3), (576, 4, 287), (1, 8, 1)])
def test_unpack_wrong_packed_length_raises(n, bits, nbytes):
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(2, nbytes, dtype=torch.uint8), bits, n)
