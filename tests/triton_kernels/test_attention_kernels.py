"""Decode and prefill kernels against reference paged attention (TRITON_INTERPRET=1 on CPU).

Both read pages written by the Triton write kernel; the oracle reads the same pages with
reference/page_codec.py, so a disagreement isolates the attention kernels.
"""

import pytest
import torch
from helpers import layout_for, make_batch, write_batch
from vllm_kvpress.triton_kernels.decode_attention import decode_attention, split_buffers
from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention

from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention

# (method, settings, heads, kv_heads, head_size): GQA groups 1, 3, 4, 5, 7 and 8 over both head sizes
CASES = [
    ("kivi", {"bits": 4}, 9, 3, 64),
    ("kivi", {"bits": 2, "group_size": 32}, 8, 8, 128),
    ("kivi", {"bits": 8}, 32, 4, 128),
    ("gear", {"bits": 4}, 14, 2, 64),
    ("gear", {"bits": 2}, 5, 1, 128),
    ("gear", {"bits": 4, "rank": 2}, 8, 1, 128),
]
# two decodes (one on a partial block, one ending exactly on a block) then two prefills, one
# continuing a compressed context that ends mid-block, one from scratch
CONTEXT_LENS, QUERY_LENS = [130, 63, 70, 0], [1, 1, 70, 90]
# bf16 outputs of fp32 math: one bf16 ulp at |out| <= 4 is 2^-6
TOL = dict(atol=2e-2, rtol=1.6e-2)


def _setup(method, settings, heads, kv_heads, head_size, device):
    layout, iters = layout_for(method, head_size, **settings)
    bs = layout.block_size
    batch = make_batch(CONTEXT_LENS, QUERY_LENS, kv_heads, head_size, bs, device=device)
    cache, k_new, v_new = write_batch(batch, layout, iters, spare_blocks=4)
    q = torch.randn(sum(QUERY_LENS), heads, head_size, device=device).bfloat16()
    expected = paged_attention(
        q.cpu(), k_new.cpu(), v_new.cpu(), batch.query_start_loc().tolist(), batch.seq_lens,
        lambda i, s: page_codec.read_sequence(cache.cpu(), batch.block_table[i].cpu(), s, layout), head_size ** -0.5,
    )
    return layout, batch, cache, q, k_new, v_new, expected


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(method, settings, heads, kv_heads, head_size, num_splits, device):
    layout, batch, cache, q, _, _, expected = _setup(method, settings, heads, kv_heads, head_size, device)
    out = torch.full((2, heads, head_size), float("nan"), device=device).bfloat16()
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=device)
    decode_attention(q[:2], cache, batch.block_table, seq_lens, out, layout, scale=head_size ** -0.5,
                     num_splits=num_splits, split_buffers=split_buffers(2 * num_splits, heads, head_size, device))
    torch.testing.assert_close(out.float().cpu(), expected[:2], **TOL)


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", CASES)
def test_prefill_matches_reference(method, settings, heads, kv_heads, head_size, device):
    layout, batch, cache, q, k_new, v_new, expected = _setup(method, settings, heads, kv_heads, head_size, device)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=device)
    prefill_attention(q, k_new, v_new, out, cache, batch.block_table, batch.query_start_loc().to(device), seq_lens,
                      layout, scale=head_size ** -0.5, first_seq=2, num_seqs=2, max_query_len=max(QUERY_LENS))
    torch.testing.assert_close(out[2:].float().cpu(), expected[2:], **TOL)
    assert out[:2].isnan().all()  # decode rows belong to the decode kernel


def test_zero_length_sequence_gives_zeros(device):
    """CUDA-graph padding rows have seq_len 0: no page is read and the output is 0, not NaN."""
    layout, _ = layout_for("kivi", 64)
    cache = torch.zeros(4, 1, layout.bytes_per_head, dtype=torch.uint8, device=device)
    q = torch.randn(2, 4, 64, device=device).bfloat16()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, torch.zeros(2, 1, dtype=torch.int32, device=device),
                     torch.zeros(2, dtype=torch.int32, device=device), out, layout, scale=0.125,
                     num_splits=2, split_buffers=split_buffers(4, 4, 64, device))
    assert out.eq(0).all()
