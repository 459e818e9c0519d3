"""Owns prefill attention: a chunk of new queries over the compressed context plus the fresh chunk.

    |---------- context (pages) ---------|---- this chunk (fresh bf16 K/V) ----|
    |----------------------------- seq_len --------------------------------------|
                                         |-------------- query_len ------------|

`_prefill_kernel`, grid (num_prefill_seqs, cdiv(max_query_len, BLOCK_M / group), num_kv_heads): one
program holds BLOCK_M rows, every query head of one KV head for BLOCK_M / group query tokens (the
GQA group padded to a power of two). It first walks the context blocks (dequantized in registers,
once for the whole group, through the same helpers as decode), then the chunk's own keys from the
fresh K/V tensors under the causal mask, with one online softmax. The chunk's tokens were already
written to the pages; reading them fresh keeps prefill attention exact, as KIVI and GEAR do.
"""

import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.checks import check_tensor
from vllm_kvpress.triton_kernels.decode_attention import LOG2E
from vllm_kvpress.triton_kernels.exact_tail import load_stored_k, tail_arguments
from vllm_kvpress.triton_kernels.page_format import (
    dot_dtype,
    headwise_arguments,
    headwise_block,
    headwise_row,
    load_block_v,
)

from vllm_kvpress.layout import PageLayout

BLOCK_M = 64
BLOCK_N = 64
PREFILL_NUM_WARPS = 8
"""With 4 warps the dequantized context tiles need more than 255 registers per thread under GEAR
(sm_90 build: 224-byte spill stack); 8 warps hold them without spilling."""


@triton.jit
def online_softmax_step(scores, running_max, running_sum, acc, v):
    """Fold one tile of base-2 scores [M, N] and its values [N, D] into (max, sum, acc)."""
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    # rows that have seen only masked scores keep max -inf; use 0 so exp2 stays finite
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(scores - safe_max[:, None])
    alpha = tl.exp2(running_max - safe_max)
    running_sum = running_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return new_max, running_sum, acc


@triton.jit(do_not_specialize=["first_seq"])  # the batch's decode count: one compile for all
def _prefill_kernel(
    q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,
    out_ptr, stride_ot, stride_oh,
    cache_ptr, stride_cb, stride_ch, block_table_ptr, stride_bt,
    query_start_loc_ptr, seq_lens_ptr, first_seq, scale_log2, headwise_ptr, retrieval_ptr,
    tail_ptr, stride_ts, stride_th, tail_slots_ptr,
    HEADWISE: tl.constexpr, RETRIEVAL_HEADS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, K_STAGE_GROUP: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr,
    EXACT_TAIL: tl.constexpr, K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr,
    V_META_OFF: tl.constexpr, K_LOWRANK_OFF: tl.constexpr, V_LOWRANK_OFF: tl.constexpr,
    K_SPARSE_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens per tile; rows are (token, head) pairs
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * TOKENS >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_kv_heads = tl.num_programs(2)
    if HEADWISE:  # a head-wise packed row (razor): this KV head's own blocks and token count
        kept, chunks, middle, retrieval, extra = headwise_row(headwise_ptr, retrieval_ptr, seq, kv_head, BLOCK_SIZE)
        seq_len += extra
    else:
        kept, chunks, middle, retrieval = 0, 0, 0, -1
    context_len = seq_len - query_len

    r = tl.arange(0, BLOCK_M)
    rows = tile * TOKENS + r // GROUP_PAD  # query index within the chunk, per row
    head = kv_head * GROUP + r % GROUP_PAD
    row_valid = (rows < query_len) & (r % GROUP_PAD < GROUP)
    cols = tl.arange(0, HEAD_SIZE)
    token = (q_start + rows).to(tl.int64)
    # q : (BLOCK_M, HEAD_SIZE), the whole GQA group of TOKENS query tokens, so each context block is
    # dequantized once per KV head rather than once per query head
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + cols[None, :],
                mask=row_valid[:, None], other=0.0).to(DOT_DTYPE)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_SIZE), tl.float32)

    tokens = tl.arange(0, BLOCK_SIZE)
    tail_slot = 0
    if EXACT_TAIL:
        tail_slot = tl.load(tail_slots_ptr + seq)
    for b in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        view_block, slot = b, kv_head
        if HEADWISE:
            view_block, slot = headwise_block(b, kv_head, retrieval, kept, chunks, middle, RETRIEVAL_HEADS,
                                              num_kv_heads)
        block_id = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + view_block).to(tl.int64)
        page = cache_ptr + block_id * stride_cb + slot * stride_ch
        complete = (b + 1) * BLOCK_SIZE <= seq_len
        # k, v : (BLOCK_SIZE, HEAD_SIZE) fp32
        k = load_stored_k(page, complete, tail_ptr, stride_ts, stride_th, tail_slot, kv_head, EXACT_TAIL, BLOCK_SIZE,
                          HEAD_SIZE, K_BITS, K_STAGE_GROUP, K_CODES_OFF, K_META_OFF, K_LOWRANK_OFF, K_SPARSE_OFF,
                          RANK, NUM_OUTLIERS)
        v = load_block_v(page, complete, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP, V_CODES_OFF, V_META_OFF,
                         V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * scale_log2
        scores = tl.where((b * BLOCK_SIZE + tokens < context_len)[None, :], scores, float("-inf"))
        running_max, running_sum, acc = online_softmax_step(scores, running_max, running_sum, acc, v.to(DOT_DTYPE))

    keys = tl.arange(0, BLOCK_N)
    chunk_end = tl.minimum(query_len, (tile + 1) * TOKENS)  # causal: no key beyond the last row
    for n in range(0, chunk_end, BLOCK_N):
        key_idx = n + keys
        key_valid = key_idx < query_len
        key_token = (q_start + key_idx).to(tl.int64)
        # k, v : (BLOCK_N, HEAD_SIZE), fresh from the chunk's own projections
        k = tl.load(k_ptr + key_token[:, None] * stride_kt + kv_head * stride_kh + cols[None, :],
                    mask=key_valid[:, None], other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptr + key_token[:, None] * stride_vt + kv_head * stride_vh + cols[None, :],
                    mask=key_valid[:, None], other=0.0).to(DOT_DTYPE)
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        visible = key_valid[None, :] & (key_idx[None, :] <= rows[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        running_max, running_sum, acc = online_softmax_step(scores, running_max, running_sum, acc, v)

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    *,
    scale: float,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    headwise: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of the prefill sequences `first_seq .. first_seq + num_seqs - 1` of a batch.

    Args:
        query: [num_tokens, num_heads, head_size]; key/value: [num_tokens, num_kv_heads, head_size]
            (the batch's fresh projections, fp16/bf16); out: like query, written for these sequences.
        cache, block_table, seq_lens: as in `decode_attention`.
        query_start_loc: int32 [num_batch_seqs + 1] offsets of each sequence's queries.
        max_query_len: an upper bound of these sequences' query lengths (sets the grid).
        headwise: head-wise packed rows, as in `decode_attention`.
        tail: the exact tail and each batch row's request-state slot, as in `decode_attention`.
    """
    num_heads, num_kv_heads = query.shape[1], cache.shape[1]
    check_tensor("query", query, dtype=(torch.float16, torch.bfloat16), ndim=3, shape=(None, None, layout.head_size))
    check_tensor("key", key, dtype=query.dtype, shape=(None, num_kv_heads, layout.head_size))
    check_tensor("value", value, dtype=query.dtype, shape=(None, num_kv_heads, layout.head_size))
    check_tensor("out", out, dtype=query.dtype, ndim=3)
    check_tensor("cache", cache, dtype=torch.uint8, shape=(None, None, layout.bytes_per_head))
    check_tensor("query_start_loc", query_start_loc, dtype=torch.int32, ndim=1)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    row_params, retrieval, retrieval_heads = headwise_arguments(headwise, num_kv_heads, block_table)
    tail_args = tail_arguments(tail, layout, block_table)
    grid = (num_seqs, triton.cdiv(max_query_len, BLOCK_M // group_pad), num_kv_heads)
    _prefill_kernel[grid](
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1), out, out.stride(0), out.stride(1),
        cache, cache.stride(0), cache.stride(1), block_table, block_table.stride(0),
        query_start_loc, seq_lens, first_seq, scale * LOG2E, row_params, retrieval, *tail_args,
        HEADWISE=headwise is not None, RETRIEVAL_HEADS=retrieval_heads,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_DTYPE=dot_dtype(query.dtype),
        **layout.kernel_constants, num_warps=PREFILL_NUM_WARPS,
    )
    return out
