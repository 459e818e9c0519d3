"""Head-wise packing (RazorAttention): every kept chunk of every head has its own (block, head slot),
inside the kept view, and the freed blocks are what packing saves."""

import numpy as np
import pytest
import torch
from helpers import layout_for, make_batch
from hypothesis import given
from hypothesis import strategies as st
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages

from vllm_kvpress.eviction.headwise import compact_prompt_headwise
from vllm_kvpress.headwise_layout import (
    head_token_count,
    kept_blocks_with_packing,
    logical_block_location,
    middle_blocks,
)
from vllm_kvpress.reference import page_codec


@given(prompt_blocks=st.integers(0, 300), kept=st.integers(0, 40), kv_heads=st.integers(1, 16),
       tail_blocks=st.integers(0, 5), data=st.data())
def test_every_heads_blocks_land_on_distinct_units_inside_the_view(prompt_blocks, kept, kv_heads, tail_blocks, data):
    kept = min(kept, prompt_blocks)
    retrieval = data.draw(st.integers(0, kv_heads))
    retrieval_heads = sorted(data.draw(st.permutations(range(kv_heads)))[:retrieval])
    chunks = prompt_blocks - kept
    middle = middle_blocks(prompt_blocks, kept, retrieval, kv_heads)
    view_blocks = kept_blocks_with_packing(prompt_blocks, kept, retrieval, kv_heads) + tail_blocks
    used = {}
    for head in range(kv_heads):
        index = retrieval_heads.index(head) if head in retrieval_heads else -1
        own = kept + (chunks if index >= 0 else 0) + tail_blocks
        for j in range(own):
            where = logical_block_location(j, head, index, kept=kept, chunks=chunks, middle=middle,
                                           retrieval_heads=retrieval, kv_heads=kv_heads)
            assert 0 <= where[0] < view_blocks and 0 <= where[1] < kv_heads
            assert where not in used, f"{where} holds both {used[where]} and {(head, j)}"
            used[where] = (head, j)
            # the kept region and the tail stay in the head's own slot, in order
            if j < kept or j >= kept + (chunks if index >= 0 else 0):
                assert where[1] == head
    # nothing is lost: the middle is as small as the retrieval chunks allow
    assert middle * kv_heads >= chunks * retrieval > (middle - 1) * kv_heads or middle == 0


def test_without_retrieval_heads_or_chunks_the_view_is_the_plain_one():
    assert middle_blocks(100, 10, 0, 8) == 0 and middle_blocks(10, 10, 2, 8) == 0
    for j in range(12):
        for index in (-1, 0):
            assert logical_block_location(j, 3, index, kept=10, chunks=0, middle=0, retrieval_heads=1,
                                          kv_heads=8) == (j, 3)


def test_packing_frees_the_non_retrieval_share_of_the_middle():
    # 16k-token prompt, 64-token blocks: 250 full blocks; 18 kept; 2 of 8 KV heads retrieve
    assert middle_blocks(250, 18, 2, 8) == 58
    assert kept_blocks_with_packing(250, 18, 2, 8) == 76
    # arrays (the scheduler's and the builder's batch form) give the same numbers
    assert kept_blocks_with_packing(np.array([250, 18, 5]), np.array([18, 18, 5]), 2, 8).tolist() == [76, 18, 5]


def test_each_head_attends_to_its_own_token_count():
    # view: K = 2 blocks, M = 3, then a tail of 10 tokens; n = 12 chunks per retrieval head
    seq = (2 + 3) * 64 + 10
    assert head_token_count(seq, -1, chunks=12, middle=3, block_size=64) == 2 * 64 + 10
    assert head_token_count(seq, 0, chunks=12, middle=3, block_size=64) == (2 + 12) * 64 + 10


@pytest.mark.parametrize("kv_heads,retrieval", [(4, [2]), (4, [0, 3]), (3, [1])])
def test_a_packed_prompt_reads_back_per_head_as_razor_keeps_it(kv_heads, retrieval, device):
    """Compaction into the packed form, read back per head through the view (the reference reader
    the decode kernels are checked against): retrieval heads get every prompt token, the others
    their sink, the compensation token and the recent window, and every head its tail."""
    layout, iters = layout_for("kivi", 64, bits=8, block_size=16)
    bs, prompt, sink, kept = 16, 10 * 16 + 7, 4, 3
    index = [retrieval.index(h) if h in retrieval else -1 for h in range(kv_heads)]
    batch = make_batch([0], [prompt], kv_heads, 64, bs, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    write_kv_pages(batch.full_k[0], batch.full_v[0], cache, batch.slots(0, 0, prompt, bs).to(device), layout,
                   power_iters=iters)
    row = batch.block_table[0]
    stored_k, stored_v = page_codec.read_sequence(cache.cpu(), row.cpu(), prompt, layout)
    view_kept = compact_prompt_headwise(layout, cache, row, prompt, index, kept, sink)
    chunks, middle = prompt // bs - kept, middle_blocks(prompt // bs, kept, len(retrieval), kv_heads)
    assert view_kept == kept + middle < prompt // bs  # blocks were freed
    view = torch.cat([row[:view_kept], row[prompt // bs:]]).cpu()  # what the builder's view holds
    seq_len = view_kept * bs + prompt % bs
    full = prompt // bs * bs
    tol = dict(atol=0.05, rtol=0.02)  # one more 8-bit round trip
    for h in range(kv_heads):
        k, v = page_codec.read_head_sequence(cache.cpu(), view, h, index[h], seq_len, layout, kept=kept,
                                             chunks=chunks, middle=middle, retrieval_heads=len(retrieval))
        if index[h] >= 0:
            want_k, want_v = stored_k[:, h], stored_v[:, h]
        else:
            window = kept * bs - sink - 1

            def pick(x, h=h, window=window):
                return torch.cat([x[:sink, h], x[sink:full - window, h].mean(0, keepdim=True),
                                  x[full - window:full, h]])

            want_k = torch.cat([pick(stored_k), stored_k[full:, h]])
            want_v = torch.cat([pick(stored_v), stored_v[full:, h]])
        torch.testing.assert_close(k, want_k, **tol)
        torch.testing.assert_close(v, want_v, **tol)
