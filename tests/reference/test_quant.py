"""Property tests of vllm_kvpress/reference/quant.py: packing round trips and error bounds."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvpress.reference.quant import dequantize_groups, pack_codes, qmax, quantize_groups, unpack_codes

BITS = st.sampled_from([2, 4, 8])


@settings(max_examples=50, deadline=None)
@given(bits=BITS, rows=st.integers(1, 5), bytes_per_row=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, rows, bytes_per_row, seed):
    g = torch.Generator().manual_seed(seed)
    n = bytes_per_row * 8 // bits
    codes = torch.randint(0, qmax(bits) + 1, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, bytes_per_row)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_places_first_code_in_lowest_bits():
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 0b00111001


@settings(max_examples=60, deadline=None)
@given(bits=BITS, groups=st.integers(1, 8), group_len=st.sampled_from([16, 32, 64, 128]),
       scale=st.floats(1e-2, 1e2), offset=st.floats(-50, 50), seed=st.integers(0, 2**31 - 1))
def test_quantization_error_is_at_most_half_a_step(bits, groups, group_len, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(groups, group_len, generator=g) * scale + offset).bfloat16().float()
    codes, s, z = quantize_groups(x, bits)
    assert codes.max() <= qmax(bits)
    err = (dequantize_groups(codes, s, z) - x).abs()
    # half a step, plus what fp16 rounding of the stored zero and scale can add across the range
    step = s.float().unsqueeze(-1)
    fp16_slack = (x.abs().amax(-1, keepdim=True) + step * qmax(bits)) * 2**-10
    assert (err <= step / 2 + fp16_slack + 1e-6).all()


def test_error_shrinks_with_bits():
    x = torch.randn(64, 128)
    errors = [(dequantize_groups(*quantize_groups(x, b)) - x).abs().mean().item() for b in (2, 4, 8)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2]


def test_excluded_entries_do_not_set_the_range():
    x = torch.randn(4, 64)
    x[0, 5] = 1000.0
    exclude = torch.zeros_like(x, dtype=torch.bool)
    exclude[0, 5] = True
    _, s_plain, _ = quantize_groups(x, 4)
    codes, s_excl, z = quantize_groups(x, 4, exclude=exclude)
    assert s_excl[0] < s_plain[0] / 50  # the outlier no longer stretches group 0
    assert torch.equal(s_excl[1:], s_plain[1:])
    assert codes[0, 5] == qmax(4)  # clamped into the group's range


def test_constant_group_dequantizes_exactly():
    x = torch.full((2, 32), 3.25)
    codes, s, z = quantize_groups(x, 2)
    assert torch.equal(dequantize_groups(codes, s, z), x)
