"""Owns reading stored pages back as dense K/V (dequantized), for the code that must look at stored
tokens outside the attention kernels: eviction scores them and re-packs the kept ones, and the
FlashAttention prefill attends to a chunk's compressed context through them.

`_read_pages_kernel`, grid (num_rows, max_blocks, num_kv_heads): one program dequantizes one
head's block of one row with the same `load_block_k/v` the attention kernels use, so what is
read here is exactly what attention reads. Row r's first `num_tokens[r]` stored tokens land at
`dest_start[r] + t` of the output, so several sequences can share one packed [tokens, Hkv, D]
buffer (FlashAttention's varlen layout).
"""

import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.exact_tail import load_stored_k, tail_arguments
from vllm_kvpress.triton_kernels.page_format import (
    MIXED_HIGH,
    MIXED_LOW,
    MIXED_OFF,
    load_block_v,
    mixed_arguments,
    mixed_high_block,
    mixed_unit,
    packed_row,
)

from vllm_kvpress.layout import PageLayout


@triton.jit(do_not_specialize=["first_row"])  # the batch's decode count: one compile for all
def _read_pages_kernel(
    cache_ptr, stride_cb, stride_ch, block_table_ptr, stride_bt, first_row,
    num_tokens_ptr, seq_lens_ptr, dest_start_ptr,
    k_out_ptr, v_out_ptr, stride_ot, stride_oh, tail_ptr, stride_ts, stride_th, tail_slots_ptr, mixed_rows_ptr,
    MIXED: tl.constexpr, UNITS_PER_BLOCK: tl.constexpr, UNIT_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, K_STAGE_GROUP: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr,
    EXACT_TAIL: tl.constexpr, K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr,
    V_META_OFF: tl.constexpr,
    K_LOWRANK_OFF: tl.constexpr, V_LOWRANK_OFF: tl.constexpr, K_SPARSE_OFF: tl.constexpr,
    V_SPARSE_OFF: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    num_tokens = tl.load(num_tokens_ptr + r)
    row = (first_row + r).to(tl.int64)
    view_block, slot_offset, dest_block = b, head * stride_ch, b
    if MIXED == MIXED_HIGH:  # a mixed-precision row's high blocks: the important ones, then the tail
        kept, chunks, middle = packed_row(mixed_rows_ptr, row)
        num_tokens -= chunks * BLOCK_SIZE
        view_block = mixed_high_block(b, kept, middle)
        dest_block = tl.where(b < kept, b, b + chunks)  # the low tokens go between the two
    if MIXED == MIXED_LOW:  # its low-precision units, right after the important tokens
        kept, chunks, middle = packed_row(mixed_rows_ptr, row)
        num_tokens = chunks * BLOCK_SIZE
        view_block, slot_offset = mixed_unit(b, head, kept, tl.num_programs(2), UNITS_PER_BLOCK, UNIT_BYTES)
        dest_block = kept + b
    if b * BLOCK_SIZE >= num_tokens:
        return
    block_id = tl.load(block_table_ptr + row * stride_bt + view_block).to(tl.int64)
    page = cache_ptr + block_id * stride_cb + slot_offset
    # a block is complete (per-channel K, GEAR terms) once the sequence's stored tokens fill it,
    # which can be after the tokens read here (a prefill chunk completes its context's last block);
    # low-precision units are always complete
    complete = ((view_block + 1) * BLOCK_SIZE <= tl.load(seq_lens_ptr + row)) | (MIXED == MIXED_LOW)
    tail_slot = 0
    if EXACT_TAIL:
        tail_slot = tl.load(tail_slots_ptr + row)
    k = load_stored_k(page, complete, tail_ptr, stride_ts, stride_th, tail_slot, head, EXACT_TAIL, BLOCK_SIZE,
                      HEAD_SIZE, K_BITS, K_STAGE_GROUP, K_CODES_OFF, K_META_OFF, K_LOWRANK_OFF, K_SPARSE_OFF, RANK,
                      NUM_OUTLIERS)
    v = load_block_v(page, complete, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP, V_CODES_OFF, V_META_OFF,
                     V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)
    token = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    dest = tl.load(dest_start_ptr + r).to(tl.int64) + dest_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs = dest[:, None] * stride_ot + head * stride_oh + tl.arange(0, HEAD_SIZE)[None, :]
    mask = (token < num_tokens)[:, None]
    tl.store(k_out_ptr + offs, k.to(k_out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_out_ptr + offs, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def read_pages_into(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    num_tokens: torch.Tensor,
    seq_lens: torch.Tensor,
    dest_start: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    layout: PageLayout,
    *,
    first_row: int,
    max_blocks: int,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    mixed: tuple[torch.Tensor, PageLayout, int] | None = None,
) -> None:
    """Dequantize the first `num_tokens[r]` stored tokens of rows `first_row + r` of `block_table`
    into `k_out/v_out[dest_start[r] + t]`.

    Args:
        cache: uint8 [num_blocks, num_kv_heads, layout.bytes_per_head].
        block_table: int [>= first_row + R, >= max_blocks] physical block of each logical block.
        num_tokens, dest_start: int32 [R]; seq_lens: int32 [>= first_row + R], the tokens each row
            has stored (a block is read as complete iff they fill it).
        k_out, v_out: [>= max(dest_start + num_tokens), num_kv_heads, head_size], written there.
        max_blocks: an upper bound of cdiv(num_tokens[r], block_size) (sets the grid).
        tail: with `layout.exact_tail_keys`: (the layer's exact tail, int32 [>= first_row + R] each
            block-table row's request-state slot), which holds partial blocks' keys (exact_tail.py).
        mixed: with mixed-precision rows (vllm_kvpress/mixed_layout.py): (int32 [>= first_row + R, 3]
            (important K, chunks n, low blocks L) per block-table row, the low-precision units'
            layout, U). `num_tokens` then counts the tokens a row holds (n chunks where its L blocks
            are), and the rows are read in two passes, the high blocks and the low units.
    """
    num_rows, num_kv_heads = num_tokens.shape[0], cache.shape[1]
    if num_rows == 0 or max_blocks == 0:
        return
    passes = [(MIXED_OFF, layout)] if mixed is None else [(MIXED_HIGH, layout), (MIXED_LOW, mixed[1])]
    mixed_rows, units_per_block, unit_bytes = mixed_arguments(mixed, num_tokens)
    for mixed_pass, pass_layout in passes:
        _read_pages_kernel[(num_rows, max_blocks, num_kv_heads)](
            cache, cache.stride(0), cache.stride(1), block_table, block_table.stride(0), first_row,
            num_tokens, seq_lens, dest_start, k_out, v_out, k_out.stride(0), k_out.stride(1),
            *tail_arguments(tail, pass_layout, num_tokens), mixed_rows,
            MIXED=mixed_pass.value, UNITS_PER_BLOCK=units_per_block, UNIT_BYTES=unit_bytes,
            **pass_layout.kernel_constants,
        )


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
    # one row: its stored tokens are the ones read; device scalars by fill, no host-to-device copy
    one = {"dtype": torch.int32, "device": cache.device}
    count = torch.full((1,), num_tokens, **one)
    read_pages_into(cache, block_ids[None, :], count, count, torch.zeros(1, **one), k, v, layout,
                    first_row=0, max_blocks=num_blocks)
    return k, v
