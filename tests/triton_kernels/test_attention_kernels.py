"""Decode and prefill kernels against reference paged attention (TRITON_INTERPRET=1 on CPU).

Both read pages written by the Triton write kernel; the oracle reads the same pages with
reference/page_codec.py, so a disagreement isolates the attention kernels.
"""

import pytest
import torch
from helpers import layout_for, make_batch, write_batch
from vllm_kvpress.triton_kernels.decode_attention import split_buffers
from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention

from vllm_kvpress.decode import decode_attention
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention

# (method, settings, heads, kv_heads, head_size): GQA groups 1, 3, 4, 5, 7 and 8 over both head sizes
CASES = [
    ("kivi", {"bits": 4}, 9, 3, 64),
    ("kivi", {"bits": 2, "group_size": 32}, 8, 8, 128),
    ("kivi", {"bits": 8}, 32, 4, 128),
    ("gear", {"bits": 4, "outliers": 16}, 14, 2, 64),
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


@pytest.mark.parametrize("num_splits", [9, 32])
def test_many_splits_merge_over_several_reduction_steps(num_splits, device):
    """More splits than the reduction merges per step (REDUCE_SPLITS_PER_STEP): a 700-token
    sequence in 16-token blocks fills them all, a 40-token one leaves most empty."""
    from vllm_kvpress.triton_kernels.decode_attention import REDUCE_SPLITS_PER_STEP

    assert num_splits > REDUCE_SPLITS_PER_STEP
    layout, iters = layout_for("kivi", 64, block_size=16)
    batch = make_batch([699, 39], [1, 1], 1, 64, 16, device=device)
    cache, k_new, v_new = write_batch(batch, layout, iters)
    q = torch.randn(2, 4, 64, device=device).bfloat16()
    expected = paged_attention(
        q.cpu(), k_new.cpu(), v_new.cpu(), batch.query_start_loc().tolist(), batch.seq_lens,
        lambda i, s: page_codec.read_sequence(cache.cpu(), batch.block_table[i].cpu(), s, layout), 64 ** -0.5,
    )
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=device)
    decode_attention(q, cache, batch.block_table, seq_lens, out, layout, scale=64 ** -0.5, num_splits=num_splits,
                     split_buffers=split_buffers(2 * num_splits, 4, 64, device))
    torch.testing.assert_close(out.float().cpu(), expected, **TOL)


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


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_reads_head_wise_packed_pages(num_splits, device):
    """A RazorAttention-packed request (eviction/headwise.py) next to a plain one in one batch: each
    KV head attends to its own tokens, read where the packing put them (reference reader)."""
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages

    from vllm_kvpress.eviction.headwise import compact_prompt_headwise, middle_blocks

    layout, iters = layout_for("kivi", 64, bits=8, block_size=16)
    bs, heads, kv_heads, retrieval = 16, 8, 4, [0, 3]
    index = [retrieval.index(h) if h in retrieval else -1 for h in range(kv_heads)]
    prompt, kept, plain = 10 * bs + 7, 3, 40
    batch = make_batch([0, 0], [prompt + 1, plain + 1], kv_heads, 64, bs, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    row0, row1 = batch.block_table[0], batch.block_table[1]

    def write(i, a, b):
        write_kv_pages(batch.full_k[i][a:b], batch.full_v[i][a:b], cache, batch.slots(i, a, b, bs).to(device),
                       layout, power_iters=iters)

    write(0, 0, prompt)
    view_kept = compact_prompt_headwise(layout, cache, row0, prompt, index, kept, sink=4)
    write(0, prompt, prompt + 1)  # the first decode token, after compaction, in the tail block
    write(1, 0, plain + 1)
    chunks, middle = prompt // bs - kept, middle_blocks(prompt // bs, kept, len(retrieval), kv_heads)
    width = batch.block_table.shape[1]
    view0 = torch.cat([row0[:view_kept], row0[prompt // bs:]])
    table = torch.stack([torch.nn.functional.pad(view0, (0, width - view0.shape[0])), row1]).int()
    seq_lens = torch.tensor([view_kept * bs + prompt % bs + 1, plain + 1], dtype=torch.int32, device=device)
    params = torch.tensor([[kept, chunks, middle], [0, 0, 0]], dtype=torch.int32, device=device)
    ranks = torch.tensor(index, dtype=torch.int32, device=device)
    q = torch.randn(2, heads, 64, device=device).bfloat16()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, table, seq_lens, out, layout, scale=0.125, num_splits=num_splits,
                     split_buffers=split_buffers(2 * num_splits, heads, 64, device),
                     headwise=(params, ranks, len(retrieval)))
    for s, (kept_s, chunks_s, middle_s) in enumerate(params.tolist()):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            k, v = page_codec.read_head_sequence(cache.cpu(), table[s].cpu(), kv, index[kv], int(seq_lens[s]),
                                                 layout, kept=kept_s, chunks=chunks_s, middle=middle_s,
                                                 retrieval_heads=len(retrieval))
            weights = torch.softmax(k @ q[s, h].float().cpu() * 0.125, 0)
            torch.testing.assert_close(out[s, h].float().cpu(), weights @ v, **TOL)
    # the packed heads really differ: a retrieval head reads the whole prompt, the others far less
    assert page_codec.read_head_sequence(cache.cpu(), table[0].cpu(), 0, 0, int(seq_lens[0]), layout, kept=kept,
                                         chunks=chunks, middle=middle, retrieval_heads=2)[0].shape[0] == prompt + 1


def test_prefill_reads_head_wise_packed_pages(device):
    """A chunk of a packed request after its compaction (a re-prefill past the prompt) attends, per
    KV head, to that head's own context plus the chunk's fresh K/V, causally."""
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages

    from vllm_kvpress.eviction.headwise import compact_prompt_headwise, middle_blocks

    layout, iters = layout_for("kivi", 64, bits=8, block_size=16)
    bs, heads, kv_heads, retrieval = 16, 4, 2, [1]
    index = [retrieval.index(h) if h in retrieval else -1 for h in range(kv_heads)]
    prompt, kept, chunk = 9 * bs + 5, 2, 20
    batch = make_batch([0], [prompt + 3 + chunk], kv_heads, 64, bs, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    row = batch.block_table[0]

    def write(a, b):
        write_kv_pages(batch.full_k[0][a:b], batch.full_v[0][a:b], cache, batch.slots(0, a, b, bs).to(device),
                       layout, power_iters=iters)

    write(0, prompt + 3)  # the prompt and three tokens past it, as the chunk that compacted it wrote
    view_kept = compact_prompt_headwise(layout, cache, row, prompt, index, kept, sink=2)
    write(prompt + 3, prompt + 3 + chunk)  # this step's chunk
    chunks, middle = prompt // bs - kept, middle_blocks(prompt // bs, kept, 1, kv_heads)
    view = torch.cat([row[:view_kept], row[prompt // bs:]])[None].int()
    seq_len = view_kept * bs + prompt % bs + 3 + chunk
    k_new, v_new = batch.full_k[0][prompt + 3:], batch.full_v[0][prompt + 3:]
    q = torch.randn(chunk, heads, 64, device=device).bfloat16()
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_new, v_new, out, cache, view, torch.tensor([0, chunk], dtype=torch.int32, device=device),
                      torch.tensor([seq_len], dtype=torch.int32, device=device), layout, scale=0.125, first_seq=0,
                      num_seqs=1, max_query_len=chunk,
                      headwise=(torch.tensor([[kept, chunks, middle]], dtype=torch.int32, device=device),
                                torch.tensor(index, dtype=torch.int32, device=device), 1))
    for h in range(heads):
        kv = h // (heads // kv_heads)
        # read with the chunk (its tokens complete the tail block, which is then stored complete)
        k_ctx, v_ctx = page_codec.read_head_sequence(cache.cpu(), view[0].cpu(), kv, index[kv], seq_len, layout,
                                                     kept=kept, chunks=chunks, middle=middle, retrieval_heads=1)
        k_ctx, v_ctx = k_ctx[:-chunk], v_ctx[:-chunk]
        for t in range(chunk):
            k = torch.cat([k_ctx, k_new[: t + 1, kv].float().cpu()])
            v = torch.cat([v_ctx, v_new[: t + 1, kv].float().cpu()])
            weights = torch.softmax(k @ q[t, h].float().cpu() * 0.125, 0)
            torch.testing.assert_close(out[t, h].float().cpu(), weights @ v, **TOL)
