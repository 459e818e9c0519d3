"""Owns decode attention over compressed pages: split-KV, dequantization in registers, then a reduction.

`_decode_split_kernel`, grid (num_seqs, num_kv_heads, num_splits): one program takes all query
heads of one KV head (the GQA group padded to at least 16 rows for `tl.dot`) and a contiguous run
of that sequence's blocks; it reads each packed block once, dequantizes it in registers, and
keeps an online softmax. It writes an unnormalized partial output, running max and sum.
`_reduce_splits_kernel`, grid (num_seqs, num_heads), merges the splits. The grid depends only on
the batch size, never on sequence lengths, so the launch is CUDA-graph safe.
"""

import torch
import triton
import triton.language as tl

from vllm_kvpress.layout import PageLayout
from vllm_kvpress.triton_kernels.checks import check_tensor
from vllm_kvpress.triton_kernels.page_format import dot_dtype, load_block_k, load_block_v

LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16
"""tl.dot needs at least 16 rows; the GQA group is padded up to this."""


@triton.jit
def _decode_split_kernel(
    q_ptr, stride_qt, stride_qh,
    cache_ptr, stride_cb, stride_ch,
    block_table_ptr, stride_bt, seq_lens_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr,
    K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr,
    V_META_OFF: tl.constexpr, K_LOWRANK_OFF: tl.constexpr, V_LOWRANK_OFF: tl.constexpr,
    K_SPARSE_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    blocks_per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)

    rows = tl.arange(0, GROUP_PAD)
    cols = tl.arange(0, HEAD_SIZE)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    # q : (GROUP_PAD, HEAD_SIZE), the decode token of `seq` is query row `seq`
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + cols[None, :],
                mask=row_valid[:, None], other=0.0).to(DOT_DTYPE)
    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_SIZE), tl.float32)
    tokens = tl.arange(0, BLOCK_SIZE)
    for b in range(first, last):
        block_id = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + b).to(tl.int64)
        page = cache_ptr + block_id * stride_cb + kv_head * stride_ch
        complete = (b + 1) * BLOCK_SIZE <= seq_len
        # k, v : (BLOCK_SIZE, HEAD_SIZE) fp32, dequantized in registers
        k = load_block_k(page, complete, BLOCK_SIZE, HEAD_SIZE, K_BITS, K_CODES_OFF, K_META_OFF,
                         K_LOWRANK_OFF, K_SPARSE_OFF, RANK, NUM_OUTLIERS)
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * scale_log2
        scores = tl.where((b * BLOCK_SIZE + tokens < seq_len)[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        alpha = tl.exp2(running_max - new_max)
        v = load_block_v(page, complete, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP, V_CODES_OFF, V_META_OFF,
                         V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)
        running_sum = running_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
        running_max = new_max

    part = (seq * NUM_SPLITS + split).to(tl.int64)
    num_heads = tl.num_programs(1) * GROUP
    base = part * num_heads + head
    tl.store(part_out_ptr + base[:, None] * HEAD_SIZE + cols[None, :], acc, mask=row_valid[:, None])
    tl.store(part_max_ptr + base, running_max, mask=row_valid)
    tl.store(part_sum_ptr + base, running_sum, mask=row_valid)


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
):
    """Grid (num_seqs, num_heads): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - max m)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    cols = tl.arange(0, HEAD_SIZE)
    valid = splits < NUM_SPLITS
    idx = (seq * NUM_SPLITS + splits).to(tl.int64) * num_heads + head
    m = tl.load(part_max_ptr + idx, mask=valid, other=float("-inf"))
    total_max = tl.max(m, 0)
    total_max = tl.where(total_max == float("-inf"), 0.0, total_max)  # all splits empty (seq_len 0)
    weight = tl.exp2(m - total_max)
    denom = tl.sum(tl.load(part_sum_ptr + idx, mask=valid, other=0.0) * weight, 0)
    acc = tl.load(part_out_ptr + idx[:, None] * HEAD_SIZE + cols[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + cols, out.to(out_ptr.dtype.element_ty))


def split_buffers(max_seqs_times_splits: int, num_heads: int, head_size: int, device) -> tuple[torch.Tensor, ...]:
    """Partial-result buffers (out, max, sum) for up to `max_seqs_times_splits` (seq, split) pairs."""
    rows = max_seqs_times_splits * num_heads
    return (
        torch.empty(rows, head_size, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
    )


def decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    layout: PageLayout,
    *,
    scale: float,
    num_splits: int,
    split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Attention of one decode token per sequence over its compressed pages.

    Args:
        query: [num_seqs, num_heads, head_size] fp16/bf16, row i = the decode token of sequence i.
        cache: uint8 [num_blocks, num_kv_heads, layout.bytes_per_head].
        block_table: int32 [>= num_seqs, max_blocks]; seq_lens: int32 [>= num_seqs] (this token included).
        out: [num_seqs, num_heads, head_size] written in place (query dtype).
        num_splits: blocks of a sequence are cut into this many runs (fixed per batch size).
        split_buffers: from `split_buffers(>= num_seqs * num_splits, num_heads, head_size)`.
    """
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads = cache.shape[1]
    check_tensor("query", query, dtype=(torch.float16, torch.bfloat16), shape=(None, None, layout.head_size))
    check_tensor("cache", cache, dtype=torch.uint8, shape=(None, None, layout.bytes_per_head))
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2)
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, ndim=1)
    check_tensor("out", out, dtype=query.dtype, shape=(num_seqs, num_heads, head_size))
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    part_out, part_max, part_sum = split_buffers
    if part_max.numel() < num_seqs * num_splits * num_heads:
        raise ValueError("split_buffers are too small for num_seqs * num_splits")
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    consts = layout.kernel_constants()
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, query.stride(0), query.stride(1),
        cache, cache.stride(0), cache.stride(1),
        block_table, block_table.stride(0), seq_lens,
        part_out, part_max, part_sum,
        scale * LOG2E,
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        DOT_DTYPE=dot_dtype(query.dtype),
        **consts, num_warps=4,
    )
    _reduce_splits_kernel[(num_seqs, num_heads)](
        part_out, part_max, part_sum, out, out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_SIZE=head_size,
        num_warps=1,
    )
    return out
