"""Reference paged attention: equal to dense attention when nothing is compressed; page codec reads."""

import pytest
import torch
from helpers import layout_for, make_batch

from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import causal_attention, paged_attention


def _sdpa(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = (t.float().transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    kv_len, q_len = k.shape[0], q.shape[0]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("heads,kv_heads,head_size", [(9, 3, 64), (14, 2, 64), (8, 8, 128), (32, 8, 128)])
def test_causal_attention_matches_sdpa(heads, kv_heads, head_size):
    q = torch.randn(37, heads, head_size)
    k, v = torch.randn(100, kv_heads, head_size), torch.randn(100, kv_heads, head_size)
    torch.testing.assert_close(causal_attention(q, k, v, 0.125), _sdpa(q, k, v, 0.125), atol=1e-5, rtol=1e-4)


def test_paged_attention_with_uncompressed_pages_equals_dense():
    block_size, kv_heads, head_size = 16, 2, 64
    batch = make_batch([40, 0, 17], [1, 33, 5], kv_heads, head_size, block_size, dtype=torch.float32)
    # bf16-free identity pages: page b holds K/V of block_table entry b verbatim
    pages_k = torch.zeros(batch.block_table.max() + 1, block_size, kv_heads, head_size)
    pages_v = torch.zeros_like(pages_k)
    for i, s in enumerate(batch.seq_lens):
        for t in range(s):
            b = batch.block_table[i, t // block_size]
            pages_k[b, t % block_size], pages_v[b, t % block_size] = batch.full_k[i][t], batch.full_v[i][t]

    def read(i, seq_len):
        blocks = batch.block_table[i, : -(-seq_len // block_size)]
        return pages_k[blocks].flatten(0, 1)[:seq_len], pages_v[blocks].flatten(0, 1)[:seq_len]

    q = torch.randn(sum(batch.query_lens), 8, head_size)
    k_new, v_new = batch.new_kv()
    out = paged_attention(q, k_new, v_new, batch.query_start_loc().tolist(), batch.seq_lens, read, 0.125)
    qsl = batch.query_start_loc().tolist()
    for i in range(len(batch.seq_lens)):
        dense = _sdpa(q[qsl[i]:qsl[i + 1]], batch.full_k[i], batch.full_v[i], 0.125)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,bits", [("kivi", 8), ("kivi", 4), ("gear", 4)])
def test_page_codec_round_trip_error_is_bounded(method, bits):
    layout, iters = layout_for(method, 128, bits=bits)
    batch = make_batch([0], [150], 2, 128, layout.block_size)
    cache = torch.zeros(batch.block_table.max() + 1, 2, layout.bytes_per_head, dtype=torch.uint8)
    for start, end in ((0, 100), (100, 150)):
        page_codec.write_tokens(cache, batch.full_k[0][start:end], batch.full_v[0][start:end],
                                batch.slots(0, start, end, 64), layout, iters)
    k, v = page_codec.read_sequence(cache, batch.block_table[0], 150, layout)
    rel = lambda a, b: ((a - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    bound = {8: 0.01, 4: 0.15}[bits]
    assert rel(k, batch.full_k[0]) < bound and rel(v, batch.full_v[0]) < bound
