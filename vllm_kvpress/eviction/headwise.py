"""Owns compacting a prompt into head-wise packed pages (RazorAttention): the kept region every
KV head keeps, the retrieval heads' middle chunks, and their rewrite into the request's first
blocks. Where each head's blocks sit is `vllm_kvpress/headwise_layout.py`'s geometry."""

from vllm_kvpress.eviction.compaction import leading_slots
from vllm_kvpress.headwise_layout import middle_blocks


def kept_region(keys, values, retrieval_index, kept_blocks: int, block_size: int, sink: int):
    """K/V of the K kept blocks, [K * block_size, H, D] each, from every full prompt block's
    tokens (keys/values [>= P_full, H, D], P_full = prompt blocks * block_size).

    A retrieval head keeps its first K blocks of tokens. Any other head keeps its `sink` first
    tokens, one compensation token (the mean of the K and of the V of the tokens it drops, as
    RazorAttention compresses them) and the most recent tokens of the full blocks, as many as fill
    the K blocks.
    """
    import torch

    n = kept_blocks * block_size
    full = keys.shape[0]
    window = n - sink - 1
    dropped = slice(sink, full - window)
    out_k, out_v = keys[:n].clone(), values[:n].clone()
    if window < 0 or dropped.stop <= dropped.start:
        return out_k, out_v  # the kept blocks cover every token: nothing to compensate
    for h, index in enumerate(retrieval_index):
        if index >= 0:
            continue
        out_k[:, h] = torch.cat([keys[:sink, h], keys[dropped, h].mean(0, keepdim=True), keys[full - window:, h]])
        out_v[:, h] = torch.cat([values[:sink, h], values[dropped, h].mean(0, keepdim=True), values[full - window:, h]])
    return out_k, out_v


def middle_region(keys, values, retrieval_index, kept_blocks: int, block_size: int):
    """K/V of the M middle blocks, [M * block_size, H, D] each: the retrieval heads' chunks after
    the kept blocks, packed into the head slots as `logical_block_location` places them (unused
    units hold zeros and are never read)."""
    import torch

    num_heads = keys.shape[1]
    chunks = keys.shape[0] // block_size - kept_blocks
    retrieval = [h for h, index in sorted(enumerate(retrieval_index), key=lambda x: x[1]) if index >= 0]
    middle = middle_blocks(keys.shape[0] // block_size, kept_blocks, len(retrieval), num_heads)
    out_k = keys.new_zeros(middle * block_size, num_heads, keys.shape[2])
    out_v = torch.zeros_like(out_k)
    for i, h in enumerate(retrieval):
        for c in range(chunks):
            unit = c * len(retrieval) + i
            dst = slice((unit // num_heads) * block_size, (unit // num_heads + 1) * block_size)
            src = slice((kept_blocks + c) * block_size, (kept_blocks + c + 1) * block_size)
            out_k[dst, unit % num_heads] = keys[src, h]
            out_v[dst, unit % num_heads] = values[src, h]
    return out_k, out_v


def compact_prompt_headwise(layout, cache, block_table_row, prompt_len: int, retrieval_index, kept_blocks: int,
                            sink: int, *, dtype=None, power_iters: int = 1) -> int:
    """Rewrite one layer's prompt pages of a request into the packed form: the kept region in
    view blocks [0, K), the middle in [K, K + M) (the request's first K + M physical blocks).
    Blocks [K + M, P // block_size) are then free; the tail block is not touched. Returns K + M.

    Args:
        cache: the layer's pages, uint8 [num_blocks, H, bytes_per_head].
        block_table_row: the request's physical block ids (not a view).
        retrieval_index: per KV head of this layer, its rank among the retrieval heads, or -1.
        dtype: the model's dtype, what the cache write gets (bf16 by default).
    """
    import torch

    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.read_pages import read_pages

    bs = layout.block_size
    full = prompt_len // bs * bs
    keys, values = read_pages(cache, block_table_row, full, layout)
    kept_k, kept_v = kept_region(keys, values, retrieval_index, kept_blocks, bs, sink)
    mid_k, mid_v = middle_region(keys, values, retrieval_index, kept_blocks, bs)
    k, v = torch.cat([kept_k, mid_k]), torch.cat([kept_v, mid_v])
    slots = leading_slots(block_table_row, k.shape[0], bs)
    dtype = dtype or torch.bfloat16
    write_kv_pages(k.to(dtype), v.to(dtype), cache, slots, layout, power_iters=power_iters, num_seqs=1)
    return k.shape[0] // bs
