"""Owns the geometry of head-wise packed pages (RazorAttention): where each KV head's kept
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

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadPacking:
    """Head-wise packing: besides the `budget` tokens every KV head keeps, `retrieval_heads` of
    every layer's `kv_heads` keep all full prompt blocks, packed into as few extra blocks as their
    share needs."""

    retrieval_heads: int
    kv_heads: int

    def middle_blocks(self, prompt_blocks, kept_blocks):
        """M: view blocks of the retrieval heads' packed chunks (`middle_blocks` below)."""
        return middle_blocks(prompt_blocks, kept_blocks, self.retrieval_heads, self.kv_heads)


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
