"""Kernel parity at real shapes on the GPU (Llama-3.1-8B, SmolLM2, Qwen2.5-0.5B heads), against the
PyTorch reference on the same pages. Run on the GPU machine: pytest -m gpu tests/gpu."""

import numpy as np
import pytest
import torch
from helpers import layout_for, make_batch
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from vllm_kvpress.triton_kernels.decode_attention import split_buffers
from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention

from vllm_kvpress.backend.flash_prefill import (
    flash_attention_version,
    flash_prefill_attention,
    plan_flash_prefill,
)
from vllm_kvpress.decode import decode_attention
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention

pytestmark = pytest.mark.gpu

# (method, settings, heads, kv_heads, head_size)
SHAPES = [
    ("gear", {"bits": 4, "outliers": 16}, 32, 8, 128),  # Llama-3.1-8B
    ("kivi", {"bits": 2}, 32, 8, 128),
    ("gear", {"bits": 2}, 9, 3, 64),  # SmolLM2-135M
    ("kivi", {"bits": 4}, 14, 2, 64),  # Qwen2.5-0.5B
    # vLLM's default block size: the smallest tiles the kernels unpack (2 bits: 256 bytes per tile)
    ("kivi", {"bits": 2, "block_size": 16}, 14, 2, 64),
    ("gear", {"bits": 4, "block_size": 16}, 9, 3, 64),
]
CONTEXT_LENS, QUERY_LENS = [3000, 777, 1500, 0], [1, 1, 700, 2100]
TOL = dict(atol=2e-2, rtol=1.6e-2)
INT32_OVERFLOW_BYTES = 2**31
NEAR_TIE_FRACTION = 1e-4


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", SHAPES)
def test_write_decode_prefill_match_reference_at_real_shapes(method, settings, heads, kv_heads, head_size):
    layout, iters = layout_for(method, head_size, **settings)
    bs = layout.block_size
    batch = make_batch(CONTEXT_LENS, QUERY_LENS, kv_heads, head_size, bs, device="cuda")
    # place every block above 2 GiB of cache so that int32 page offsets would overflow
    block_bytes = kv_heads * layout.bytes_per_head
    base = INT32_OVERFLOW_BYTES // block_bytes + 1
    num_blocks = base + int(batch.block_table.max()) + 1
    cache = torch.zeros(num_blocks, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device="cuda")
    batch.block_table += base
    def write(k, v, slots):
        write_kv_pages(k, v, cache, slots, layout, power_iters=iters)

    batch.write_context(write, bs)
    k_new, v_new = batch.write_new(write, bs)

    # the write kernels against the reference writer, on the used blocks only
    used = torch.unique(batch.block_table.flatten())
    ref_cache = torch.zeros(num_blocks, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device="cuda")
    def write_reference(k, v, slots):
        page_codec.write_tokens(ref_cache, k, v, slots, layout, iters)

    batch.write_context(write_reference, bs)
    batch.write_new(write_reference, bs)
    for i, s in enumerate(batch.seq_lens):
        got = page_codec.read_sequence(cache, batch.block_table[i], s, layout)
        want = page_codec.read_sequence(ref_cache, batch.block_table[i], s, layout)
        scale = batch.full_k[i].float().abs().max().item()
        for g, w in zip(got, want):
            far = ((g - w).abs() > 2e-3 * scale).float().mean().item()
            # GEAR: on a near-tie of z-scores (fp32 sums in another order on the GPU) an outlier slot
            # goes to a different entry: a handful of entries per million, never plain quantization
            assert far <= (NEAR_TIE_FRACTION if layout.num_outliers else 0.0), f"{far:.2e} of entries differ"
    if layout.rank == 0 and layout.num_outliers == 0:
        assert torch.equal(cache[used], ref_cache[used])

    q = torch.randn(sum(QUERY_LENS), heads, head_size, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device="cuda")
    decode_attention(q[:2], cache, batch.block_table, seq_lens, out[:2], layout, scale=head_size ** -0.5,
                     num_splits=4, split_buffers=split_buffers(8, heads, head_size, "cuda"))
    prefill_attention(q, k_new, v_new, out, cache, batch.block_table, batch.query_start_loc().cuda(), seq_lens,
                      layout, scale=head_size ** -0.5, first_seq=2, num_seqs=2, max_query_len=max(QUERY_LENS))
    expected = paged_attention(q, k_new, v_new, batch.query_start_loc().tolist(), batch.seq_lens,
                               lambda i, s: page_codec.read_sequence(cache, batch.block_table[i], s, layout),
                               head_size ** -0.5)
    torch.testing.assert_close(out.float(), expected, **TOL)

    # the prefill vLLM runs on Hopper: FlashAttention over the dequantized context and the chunk
    plan = plan_flash_prefill(batch.query_start_loc().numpy(), np.array(batch.seq_lens), 2, 2, bs, "cuda",
                              flash_attention_version())
    out_fa = torch.full_like(q, float("nan"))
    flash_prefill_attention(q, k_new, v_new, out_fa, cache, batch.block_table, seq_lens, layout, plan,
                            scale=head_size ** -0.5, first_seq=2)
    torch.testing.assert_close(out_fa[2:].float(), expected[2:], **TOL)
    assert out_fa[:2].isnan().all()


def test_decode_replays_correctly_in_a_cuda_graph():
    """The decode launch is captured once and replayed with new lengths, as vLLM's FULL graphs do."""
    layout, iters = layout_for("gear", 128, bits=4)
    batch = make_batch([2000, 1000], [1, 1], 8, 128, layout.block_size, device="cuda")
    cache = torch.zeros(int(batch.block_table.max()) + 1, 8, layout.bytes_per_head, dtype=torch.uint8, device="cuda")
    for i, s in enumerate(batch.seq_lens):
        write_kv_pages(batch.full_k[i], batch.full_v[i], cache, batch.slots(i, 0, s, 64).cuda(), layout,
                       power_iters=iters)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    seq_lens = torch.tensor([1, 1], dtype=torch.int32, device="cuda")
    buffers = split_buffers(8, 32, 128, "cuda")
    run = lambda: decode_attention(q, cache, batch.block_table, seq_lens, out, layout, scale=128 ** -0.5,  # noqa: E731
                                   num_splits=4, split_buffers=buffers)
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    seq_lens.copy_(torch.tensor(batch.seq_lens, device="cuda"))
    graph.replay()
    expected = paged_attention(q, torch.empty(0), torch.empty(0), [0, 1, 2], batch.seq_lens,
                               lambda i, s: page_codec.read_sequence(cache, batch.block_table[i], s, layout),
                               128 ** -0.5)
    torch.testing.assert_close(out.float(), expected, **TOL)
