"""Owns the head-wise packing of a compacted prompt (RazorAttention): where each KV head's kept
tokens sit when retrieval heads keep every prompt token and the other heads only a few.

One block table serves every KV head and layer, and a page holds all KV heads of `block_size`
tokens, so a prompt whose retrieval heads keep everything would free no block. Packing frees them:
after compaction the request's view is

    | kept: K blocks | middle: M blocks                  | tail ...
      every head       retrieval heads' chunks, packed      every head: the last partial prompt
      (sink, compensation, window for the others;           block and the generated tokens
       the first K blocks of tokens for retrieval heads)

The middle holds, for each of the R retrieval heads of a layer, its n = P // block_size - K prompt
chunks (block_size tokens each) after the kept ones, laid out as units (block, head slot):
chunk c of the i-th retrieval head is unit c * R + i, in block K + unit // H, head slot unit % H
(H KV heads). So M = ceil(n * R / H) blocks replace n, and every layer has the same R (the layers
share the blocks). A head's logical block j then lives at:

    non-retrieval head h:  j < K: (j, h);  else the tail: (j + M, h)
    retrieval head i:      j < K: (j, h);  K <= j < K + n: middle unit (j - K) * R + i;
                           else the tail: (j - n + M, h)

in view blocks. With n = 0 (a request not compacted) every head maps block j to (j, h).
"""

import numpy as np


def middle_blocks(prompt_blocks, kept_blocks, retrieval_heads: int, kv_heads: int):
    """M: view blocks that hold the retrieval heads' middle chunks (0 where nothing is packed).

    Args:
        prompt_blocks: full prompt blocks, P // block_size (int or int array).
        kept_blocks: K, the blocks every head keeps (int or int array), at most prompt_blocks.
        retrieval_heads, kv_heads: R and H of every layer.
    """
    chunks = np.maximum(np.asarray(prompt_blocks, dtype=np.int64) - kept_blocks, 0)
    m = -(-chunks * retrieval_heads // kv_heads)
    return int(m) if np.ndim(m) == 0 else m


def kept_blocks_with_packing(prompt_blocks, kept_blocks, retrieval_heads: int, kv_heads: int):
    """Leading view blocks a compacted prompt keeps: K + M."""
    return kept_blocks + middle_blocks(prompt_blocks, kept_blocks, retrieval_heads, kv_heads)


def logical_block_location(j: int, head: int, retrieval_index: int, *, kept: int, chunks: int, middle: int,
                           retrieval_heads: int, kv_heads: int) -> tuple[int, int]:
    """(view block, head slot) of logical block j of KV head `head`; `retrieval_index` is the
    head's rank among the layer's retrieval heads (0..R-1), or -1 for a non-retrieval head.
    `kept`, `chunks`, `middle`: K, n, M of the request."""
    if j < kept:
        return j, head
    if retrieval_index < 0:
        return j + middle, head
    if j < kept + chunks:
        unit = (j - kept) * retrieval_heads + retrieval_index
        return kept + unit // kv_heads, unit % kv_heads
    return j - chunks + middle, head


def head_token_count(seq_len: int, retrieval_index: int, *, chunks: int, middle: int, block_size: int) -> int:
    """Tokens KV head attends to, from the view's sequence length (K + M blocks, then the tail):
    a non-retrieval head skips the M middle blocks, a retrieval head reads its n chunks there."""
    own = chunks if retrieval_index >= 0 else 0
    return seq_len - middle * block_size + own * block_size


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
    token = torch.arange(k.shape[0], device=cache.device)
    slots = block_table_row[token // bs].to(torch.int64) * bs + token % bs
    dtype = dtype or torch.bfloat16
    write_kv_pages(k.to(dtype), v.to(dtype), cache, slots, layout, power_iters=power_iters, num_seqs=1)
    return k.shape[0] // bs
