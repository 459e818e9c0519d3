"""Tests of GEAR's per-block error correction (reference/gear.py, reference/page_codec.py)."""

import pytest
import torch
from helpers import layout_for

from vllm_kvpress.reference.gear import group_zscores, lowrank_factors, lowrank_product, select_outliers
from vllm_kvpress.reference.page_codec import decode_block, encode_complete


def test_select_outliers_takes_the_top_scores_and_never_more_than_n():
    z = torch.rand(64, 128)
    mask = select_outliers(z, 32)
    assert mask.sum() == 32
    assert z[mask].min() > z[~mask].max()
    tied = torch.zeros(8, 8)
    tied[0, :4] = 5.0  # four equal scores cannot share 2 slots: none is taken
    assert select_outliers(tied, 2).sum() == 0


def test_zscores_flag_the_planted_spike():
    x = torch.randn(16, 64)
    x[3, 7] += 25.0
    z = group_zscores(x)
    assert z.argmax().item() == 3 * 64 + 7


def test_lowrank_factors_recover_a_rank_one_matrix():
    a, b = torch.randn(64), torch.randn(128)
    m = torch.outer(a, b)
    fa, fb = lowrank_factors(m, rank=1, iters=3)
    assert torch.allclose(lowrank_product(fa, fb), m, atol=2e-2 * m.abs().max())
    assert fb.float().norm().item() == pytest.approx(1.0, abs=1e-3)


def _block_error(x: torch.Tensor, is_key: bool, method: str, bits: int, group_size, **settings) -> float:
    layout, iters = layout_for(method, x.shape[1], bits=bits, group_size=group_size, **settings)
    page = torch.zeros(layout.bytes_per_head, dtype=torch.uint8)
    encode_complete(page, x, is_key, layout, iters)
    k, v = decode_block(page, layout, complete=True)
    return ((k if is_key else v) - x).pow(2).mean().item()


@pytest.mark.parametrize("bits", [2, 4])
def test_gear_beats_plain_quantization_on_synthetic_blocks(bits):
    x = torch.randn(64, 128) + 0.3 * torch.outer(torch.randn(64), torch.randn(128))
    x[10, 20] += 15.0
    # the spike stretches one quantization group; removing it (an outlier slot) and fitting the
    # residual must pay off
    for is_key in (True, False):
        gear = _block_error(x, is_key, "gear", bits, "head", outliers=16)
        assert gear < 0.9 * _block_error(x, is_key, "kivi", bits, "head")
