"""Owns reading a sequence's compressed pages back as dense K/V (dequantized), for the code that
must look at stored tokens outside attention: eviction scores them and re-packs the kept ones.

`_read_pages_kernel`, grid (num_blocks, num_kv_heads): one program dequantizes one head's block
with the same `load_block_k/v` the attention kernels use, so what eviction scores is exactly what
attention reads.
"""

import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.page_format import load_block_k, load_block_v

from vllm_kvpress.layout import PageLayout


@triton.jit
def _read_pages_kernel(
    cache_ptr, stride_cb, stride_ch, block_ids_ptr, num_tokens,
    k_out_ptr, v_out_ptr, stride_ot, stride_oh,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, K_STAGE_GROUP: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr,
    K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr, V_META_OFF: tl.constexpr,
    K_LOWRANK_OFF: tl.constexpr, V_LOWRANK_OFF: tl.constexpr, K_SPARSE_OFF: tl.constexpr,
    V_SPARSE_OFF: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    block_id = tl.load(block_ids_ptr + b).to(tl.int64)
    page = cache_ptr + block_id * stride_cb + head * stride_ch
    complete = (b + 1) * BLOCK_SIZE <= num_tokens
    k = load_block_k(page, complete, BLOCK_SIZE, HEAD_SIZE, K_BITS, K_STAGE_GROUP, K_CODES_OFF, K_META_OFF,
                     K_LOWRANK_OFF, K_SPARSE_OFF, RANK, NUM_OUTLIERS)
    v = load_block_v(page, complete, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP, V_CODES_OFF, V_META_OFF,
                     V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)
    token = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs = token.to(tl.int64)[:, None] * stride_ot + head * stride_oh + tl.arange(0, HEAD_SIZE)[None, :]
    mask = (token < num_tokens)[:, None]
    tl.store(k_out_ptr + offs, k.to(k_out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_out_ptr + offs, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def read_pages(
    cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, layout: PageLayout,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V of the first `num_tokens` tokens stored in `block_ids` (in order).

    Args:
        cache: uint8 [num_blocks, num_kv_heads, layout.bytes_per_head].
        block_ids: int [>= cdiv(num_tokens, block_size)] physical block of each logical block.
        num_tokens: tokens to read; a last block holding fewer than block_size tokens is read as
            a partial (staged) block, every other block as complete.
    Returns:
        K, V of `dtype`, [num_tokens, num_kv_heads, head_size] each.
    """
    num_kv_heads = cache.shape[1]
    num_blocks = -(-num_tokens // layout.block_size)
    if block_ids.shape[0] < num_blocks:
        raise ValueError(f"{num_tokens} tokens need {num_blocks} blocks, got {block_ids.shape[0]} block ids")
    k = torch.empty(num_tokens, num_kv_heads, layout.head_size, dtype=dtype, device=cache.device)
    v = torch.empty_like(k)
    if num_tokens:
        _read_pages_kernel[(num_blocks, num_kv_heads)](
            cache, cache.stride(0), cache.stride(1), block_ids, num_tokens,
            k, v, k.stride(0), k.stride(1), **layout.kernel_constants,
        )
    return k, v
