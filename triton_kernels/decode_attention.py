"""Owns decode attention over compressed pages: split-KV, dequantization folded into the matmuls.

`_decode_split_kernel`, grid (num_seqs, num_kv_heads, num_splits): one program takes all query heads
of one KV head (the GQA group, padded to a power of two; Triton pads `tl.dot` to its MMA shape) and
a contiguous run of that sequence's blocks, reads each packed block once and keeps an online
softmax. Decode is bound by the bytes it reads, so the per-element work is kept to unpacking codes:

- K of a complete block is `code * s_c + z_c` per channel, so q.k = (q * s).code + q.z: the scale
  goes into the (few-row) query once per block instead of into the (block_size-row) key tile;
- V is `code * s_t + z_t` per token (and channel group), so p.V = (p * s_t).code + p.z_t;
- codes become dot operands through the magic-number OR of `codes_as_operand`;
- GEAR's low-rank and sparse terms are applied to scores and outputs (rank-r vectors and one-hot
  products of the outlier slots), never to the tiles;
- the products are computed transposed (scores^T = K q^T, out^T = V^T p^T): the packed tiles are
  the A operand, packed along the dimension the product reduces over (layout.py), so Triton feeds
  them to the tensor cores straight from registers; only the few query rows go through shared memory.

`_reduce_splits_kernel`, grid (num_seqs, num_heads), merges the splits, whichever kernel wrote them
(`vllm_kvpress.decode` runs the CUDA split kernel, vllm_kvpress/cuda_decode.py, wherever it takes the
pages, since it reaches the tensor cores without Triton's layout conversions). The grid depends only
on the batch size, never on sequence lengths, so the launch is CUDA-graph safe.
"""

import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.exact_tail import load_tail_k
from vllm_kvpress.triton_kernels.page_format import (
    MIXED_HIGH,
    MIXED_LOW,
    code_bias,
    dequantize_staged_k,
    dot_dtype,
    fp16_ptr,
    headwise_block,
    headwise_row,
    load_codes,
    load_codes_operand,
    load_outliers,
    mixed_high_block,
    mixed_unit,
    packed_row,
)

from vllm_kvpress.layout import PageLayout

LOG2E = 1.4426950408889634
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
MAX_SPLITS = 32
"""Most splits per sequence (the split buffers are sized for it)."""
REDUCE_SPLITS_PER_STEP = 8
"""Splits the reduction merges per loop step: 8 partial rows of registers whatever the split count
(a batch with one split reads one step)."""


@triton.jit
def gear_score_terms(q_t, q_rows_ptr, row_valid, page, LOWRANK_OFF: tl.constexpr, SPARSE_OFF: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, RANK: tl.constexpr,
                     NUM_OUTLIERS: tl.constexpr):
    """(a b^T + S) q^T for one block: [BLOCK_SIZE, rows] fp32. q_t fp32 [HEAD_SIZE, rows]."""
    tokens = tl.arange(0, BLOCK_SIZE)
    extra = tl.zeros((BLOCK_SIZE, q_t.shape[1]), tl.float32)
    lowrank = fp16_ptr(page + LOWRANK_OFF)
    for r in tl.static_range(RANK):
        a = tl.load(lowrank + r * BLOCK_SIZE + tokens).to(tl.float32)
        b = tl.load(lowrank + RANK * BLOCK_SIZE + r * HEAD_SIZE + tl.arange(0, HEAD_SIZE)).to(tl.float32)
        extra += a[:, None] * tl.sum(q_t * b[:, None], 0)[None, :]
    if NUM_OUTLIERS > 0:
        token, channel, value = load_outliers(page, SPARSE_OFF, NUM_OUTLIERS, HEAD_SIZE)
        # q[:, c_i] * value_i, gathered from global memory (the query rows are tiny and cached)
        q_at = tl.load(q_rows_ptr[None, :] + channel[:, None], mask=row_valid[None, :], other=0.0)
        by_token = (token[None, :] == tokens[:, None]).to(tl.float16)  # [BLOCK_SIZE, NUM_OUTLIERS]
        extra += tl.dot(by_token, (q_at.to(tl.float32) * value[:, None]).to(tl.float16))
    return extra


@triton.jit
def gear_output_terms(p_t, page, LOWRANK_OFF: tl.constexpr, SPARSE_OFF: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, RANK: tl.constexpr,
                      NUM_OUTLIERS: tl.constexpr):
    """(a b^T + S)^T p^T for one block: [HEAD_SIZE, rows] fp32. p_t fp32 [BLOCK_SIZE, rows]."""
    cols = tl.arange(0, HEAD_SIZE)
    extra = tl.zeros((HEAD_SIZE, p_t.shape[1]), tl.float32)
    lowrank = fp16_ptr(page + LOWRANK_OFF)
    for r in tl.static_range(RANK):
        a = tl.load(lowrank + r * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)).to(tl.float32)
        b = tl.load(lowrank + RANK * BLOCK_SIZE + r * HEAD_SIZE + cols).to(tl.float32)
        extra += b[:, None] * tl.sum(p_t * a[:, None], 0)[None, :]
    if NUM_OUTLIERS > 0:
        token, channel, value = load_outliers(page, SPARSE_OFF, NUM_OUTLIERS, HEAD_SIZE)
        by_token = (token[:, None] == tl.arange(0, BLOCK_SIZE)[None, :]).to(tl.float16)
        p_at = tl.dot(by_token, p_t.to(tl.float16))  # [NUM_OUTLIERS, rows]: p[t_i, :]
        by_channel = (channel[None, :] == cols[:, None]).to(tl.float16)  # [HEAD_SIZE, NUM_OUTLIERS]
        extra += tl.dot(by_channel, (p_at * value[:, None]).to(tl.float16))
    return extra


@triton.jit
def block_output_t(p_t, page, complete, DOT_DTYPE: tl.constexpr, V_BIAS: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, V_BITS: tl.constexpr,
                   V_GROUP: tl.constexpr, V_CODES_OFF: tl.constexpr, V_META_OFF: tl.constexpr,
                   V_LOWRANK_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr, RANK: tl.constexpr,
                   NUM_OUTLIERS: tl.constexpr):
    """(p.V)^T for one block, p_t fp32 [BLOCK_SIZE, rows] -> [HEAD_SIZE, rows] fp32."""
    GROUPS: tl.constexpr = HEAD_SIZE // V_GROUP
    ROWS: tl.constexpr = p_t.shape[1]
    # codes : (HEAD_SIZE, BLOCK_SIZE), V_BIAS + code, as stored (channel-major)
    codes = load_codes_operand(page, V_CODES_OFF, HEAD_SIZE, BLOCK_SIZE, V_BITS, DOT_DTYPE, V_BIAS)
    meta = fp16_ptr(page + V_META_OFF)
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    scale = tl.load(meta + offs).to(tl.float32)  # [BLOCK_SIZE, GROUPS]
    zero = tl.load(meta + BLOCK_SIZE * GROUPS + offs).to(tl.float32)
    # one column block of p * s_g per channel group g; each keeps only its own group's rows (channels)
    p_scaled = tl.reshape(p_t[:, None, :] * scale[:, :, None], (BLOCK_SIZE, GROUPS * ROWS)).to(DOT_DTYPE)
    shift = tl.sum(p_t[:, None, :] * zero[:, :, None]
                   - V_BIAS * tl.reshape(p_scaled.to(tl.float32), (BLOCK_SIZE, GROUPS, ROWS)), 0)  # [GROUPS, ROWS]
    per_group = tl.reshape(tl.dot(codes, p_scaled), (HEAD_SIZE, GROUPS, ROWS)) + shift[None, :, :]
    if GROUPS == 1:
        out = tl.reshape(per_group, (HEAD_SIZE, ROWS))
    else:
        own = (tl.arange(0, HEAD_SIZE) // V_GROUP)[:, None, None] == tl.arange(0, GROUPS)[None, :, None]
        out = tl.sum(tl.where(own, per_group, 0.0), 1)
    if RANK > 0 or NUM_OUTLIERS > 0:
        if complete:
            out += gear_output_terms(p_t, page, V_LOWRANK_OFF, V_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, RANK,
                                     NUM_OUTLIERS)
    return out


@triton.jit
def online_softmax_update_t(scores_t, running_max, running_sum, acc_t):
    """Fold base-2 scores [n, rows] into the running max/sum; returns p [n, rows] and the rescaled acc."""
    new_max = tl.maximum(running_max, tl.max(scores_t, 0))
    p_t = tl.exp2(scores_t - new_max[None, :])
    alpha = tl.exp2(running_max - new_max)
    return p_t, new_max, running_sum * alpha + tl.sum(p_t, 0), acc_t * alpha[None, :]


@triton.jit(do_not_specialize=["split_offset", "total_splits"])
def _decode_split_kernel(
    q_ptr, stride_qt, stride_qh,
    cache_ptr, stride_cb, stride_ch,
    block_table_ptr, stride_bt, seq_lens_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr, split_offset, total_splits,
    scale_log2, headwise_ptr, retrieval_ptr, tail_ptr, stride_ts, stride_th, tail_slots_ptr,
    HEADWISE: tl.constexpr, RETRIEVAL_HEADS: tl.constexpr,
    MIXED: tl.constexpr, UNITS_PER_BLOCK: tl.constexpr, UNIT_BYTES: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
    K_BIAS: tl.constexpr, V_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, K_STAGE_GROUP: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr,
    EXACT_TAIL: tl.constexpr, K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr,
    V_META_OFF: tl.constexpr, K_LOWRANK_OFF: tl.constexpr, V_LOWRANK_OFF: tl.constexpr,
    K_SPARSE_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # not a constexpr: a batch size's split count must not recompile
    seq_len = tl.load(seq_lens_ptr + seq)
    num_kv_heads = tl.num_programs(1)
    if HEADWISE:  # a head-wise packed row (razor): this KV head's own blocks and token count
        kept, chunks, middle, retrieval, extra = headwise_row(headwise_ptr, retrieval_ptr, seq, kv_head, BLOCK_SIZE)
        seq_len += extra
    elif MIXED == MIXED_HIGH:  # a mixed-precision row's high-precision blocks: the important ones, the tail
        kept, chunks, middle = packed_row(headwise_ptr, seq)
        retrieval = -1
        seq_len -= middle * BLOCK_SIZE
    elif MIXED == MIXED_LOW:  # its low-precision units: `chunks` complete chunks of this KV head
        kept, chunks, middle = packed_row(headwise_ptr, seq)
        retrieval = -1
        seq_len = chunks * BLOCK_SIZE
    else:
        kept, chunks, middle, retrieval = 0, 0, 0, -1
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    blocks_per_split = tl.cdiv(num_blocks, num_splits)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)

    # Everything is transposed: tiles are the matmuls' A operand, the GQA group is the small N side.
    rows = tl.arange(0, GROUP_PAD)
    cols = tl.arange(0, HEAD_SIZE)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    # q_t : (HEAD_SIZE, GROUP_PAD) fp32, pre-multiplied by scale * log2(e); decode token of `seq` = row `seq`
    q_rows_ptr = q_ptr + seq.to(tl.int64) * stride_qt + head * stride_qh
    q_t = tl.load(q_rows_ptr[None, :] + cols[:, None], mask=row_valid[None, :], other=0.0).to(tl.float32) * scale_log2
    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc_t = tl.zeros((HEAD_SIZE, GROUP_PAD), tl.float32)
    tokens = tl.arange(0, BLOCK_SIZE)
    # complete blocks: the hot loop; the partial last block (if this split owns it) is handled after
    num_complete = seq_len // BLOCK_SIZE
    for b in range(first, tl.minimum(last, num_complete)):
        view_block, slot_offset = b, kv_head * stride_ch
        if HEADWISE:
            view_block, slot = headwise_block(b, kv_head, retrieval, kept, chunks, middle, RETRIEVAL_HEADS,
                                              num_kv_heads)
            slot_offset = slot * stride_ch
        if MIXED == MIXED_HIGH:
            view_block = mixed_high_block(b, kept, middle)
        if MIXED == MIXED_LOW:
            view_block, slot_offset = mixed_unit(b, kv_head, kept, num_kv_heads, UNITS_PER_BLOCK, UNIT_BYTES)
        block_id = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + view_block).to(tl.int64)
        page = cache_ptr + block_id * stride_cb + slot_offset
        # k_codes : (BLOCK_SIZE, HEAD_SIZE), K_BIAS + code in the dot dtype
        k_codes = load_codes_operand(page, K_CODES_OFF, BLOCK_SIZE, HEAD_SIZE, K_BITS, DOT_DTYPE, K_BIAS)
        k_meta = fp16_ptr(page + K_META_OFF)
        channel_scale = tl.load(k_meta + cols).to(tl.float32)
        channel_zero = tl.load(k_meta + HEAD_SIZE + cols).to(tl.float32)
        q_scaled = (q_t * channel_scale[:, None]).to(DOT_DTYPE)
        # q.z minus the magic bias, from the rounded q_scaled actually fed to the matmul
        shift = tl.sum(q_t * channel_zero[:, None] - K_BIAS * q_scaled.to(tl.float32), 0)
        scores_t = tl.dot(k_codes, q_scaled) + shift[None, :]  # (BLOCK_SIZE, GROUP_PAD)
        if RANK > 0 or NUM_OUTLIERS > 0:
            scores_t += scale_log2 * gear_score_terms(q_t / scale_log2, q_rows_ptr, row_valid, page, K_LOWRANK_OFF,
                                                      K_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, RANK, NUM_OUTLIERS)
        p_t, running_max, running_sum, acc_t = online_softmax_update_t(scores_t, running_max, running_sum, acc_t)
        acc_t += block_output_t(p_t, page, True, DOT_DTYPE, V_BIAS, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP,
                                V_CODES_OFF, V_META_OFF, V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)
    if (num_complete < last) & (num_complete >= first):
        # the sequence's partial block: staged K (plain dequantization is cheap for one block) or the
        # exact tail's, no GEAR terms
        view_block, slot = num_complete, kv_head
        if HEADWISE:
            view_block, slot = headwise_block(num_complete, kv_head, retrieval, kept, chunks, middle,
                                              RETRIEVAL_HEADS, num_kv_heads)
        if MIXED == MIXED_HIGH:  # (the low pass has no partial block: its chunks are complete)
            view_block = mixed_high_block(num_complete, kept, middle)
        block_id = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + view_block).to(tl.int64)
        page = cache_ptr + block_id * stride_cb + slot * stride_ch
        if EXACT_TAIL:
            k = load_tail_k(tail_ptr, stride_ts, stride_th, tl.load(tail_slots_ptr + seq), kv_head, BLOCK_SIZE,
                            HEAD_SIZE)
        else:
            k_codes = load_codes(page, K_CODES_OFF, BLOCK_SIZE, HEAD_SIZE, K_BITS).to(tl.float32)
            k = dequantize_staged_k(k_codes, fp16_ptr(page + K_META_OFF), BLOCK_SIZE, HEAD_SIZE, K_BITS,
                                    K_STAGE_GROUP)
        scores_t = tl.dot(k.to(DOT_DTYPE), q_t.to(DOT_DTYPE))
        scores_t = tl.where((num_complete * BLOCK_SIZE + tokens < seq_len)[:, None], scores_t, float("-inf"))
        p_t, running_max, running_sum, acc_t = online_softmax_update_t(scores_t, running_max, running_sum, acc_t)
        acc_t += block_output_t(p_t, page, False, DOT_DTYPE, V_BIAS, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP,
                                V_CODES_OFF, V_META_OFF, V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)

    part = seq.to(tl.int64) * total_splits + split_offset + split
    num_heads = tl.num_programs(1) * GROUP
    base = part * num_heads + head
    tl.store(part_out_ptr + base[None, :] * HEAD_SIZE + cols[:, None], acc_t, mask=row_valid[None, :])
    tl.store(part_max_ptr + base, running_max, mask=row_valid)
    tl.store(part_sum_ptr + base, running_sum, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, stride_ot, stride_oh, num_splits,
    SPLITS_PER_STEP: tl.constexpr, HEAD_SIZE: tl.constexpr,
):
    """Grid (num_seqs, num_heads): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - max m).
    `num_splits` is a plain argument that bounds two loops (the maximum, then the weighted sums):
    a constexpr, or an int Triton specializes on its value, compiled one kernel per decode batch
    size in a running engine, and a tile as wide as the largest split count held 32 partial rows
    of registers for batches that have one."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    steps = tl.arange(0, SPLITS_PER_STEP)
    cols = tl.arange(0, HEAD_SIZE)
    first = seq.to(tl.int64) * num_splits
    total_max = tl.full([], float("-inf"), tl.float32)
    for start in range(0, num_splits, SPLITS_PER_STEP):
        splits = start + steps
        m = tl.load(part_max_ptr + (first + splits) * num_heads + head, mask=splits < num_splits,
                    other=float("-inf"))
        total_max = tl.maximum(total_max, tl.max(m, 0))
    total_max = tl.where(total_max == float("-inf"), 0.0, total_max)  # all splits empty (seq_len 0)
    denom = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_SIZE], tl.float32)
    for start in range(0, num_splits, SPLITS_PER_STEP):
        splits = start + steps
        valid = splits < num_splits
        idx = (first + splits) * num_heads + head
        weight = tl.exp2(tl.load(part_max_ptr + idx, mask=valid, other=float("-inf")) - total_max)
        denom += tl.sum(tl.load(part_sum_ptr + idx, mask=valid, other=0.0) * weight, 0)
        part = tl.load(part_out_ptr + idx[:, None] * HEAD_SIZE + cols[None, :], mask=valid[:, None], other=0.0)
        acc += tl.sum(part * weight[:, None], 0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + cols, out.to(out_ptr.dtype.element_ty))


def split_buffers(max_seqs_times_splits: int, num_heads: int, head_size: int, device) -> tuple[torch.Tensor, ...]:
    """Partial-result buffers (out, max, sum) for up to `max_seqs_times_splits` (seq, split) pairs."""
    rows = max_seqs_times_splits * num_heads
    return (
        torch.empty(rows, head_size, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
    )


def decode_splits(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    *,
    scale: float,
    num_splits: int,
    split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    headwise_args: tuple,
    tail_args: tuple,
    headwise: bool,
    num_warps: int | None = None,
    num_stages: int = DECODE_NUM_STAGES,
    mixed_args: tuple | None = None,
    mixed_pass: int = 0,
    split_offset: int = 0,
    total_splits: int | None = None,
) -> None:
    """The split pass in Triton: each (sequence, KV head, split) program's partial results into
    `split_buffers`. Arguments as `vllm_kvpress.decode.decode_attention`, which checks them;
    `headwise_args` / `tail_args` from `headwise_arguments` / `tail_arguments`.

    Mixed-precision rows are read in two passes with their own layouts (`MIXED_HIGH` with the
    pages' layout, `MIXED_LOW` with the low-precision units' layout and `mixed_args` from
    `mixed_arguments`), each writing its splits at `split_offset` among a row's `total_splits`."""
    num_seqs, num_heads, _ = query.shape
    num_kv_heads = cache.shape[1]
    group = num_heads // num_kv_heads
    part_out, part_max, part_sum = split_buffers
    row_params, retrieval, retrieval_heads = headwise_args
    units_per_block = unit_bytes = 0
    if mixed_pass:
        row_params, units_per_block, unit_bytes = mixed_args
    num_warps = num_warps or DECODE_NUM_WARPS
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, query.stride(0), query.stride(1),
        cache, cache.stride(0), cache.stride(1),
        block_table, block_table.stride(0), seq_lens,
        part_out, part_max, part_sum, split_offset, total_splits or num_splits,
        scale * LOG2E, row_params, retrieval, *tail_args,
        HEADWISE=headwise, RETRIEVAL_HEADS=retrieval_heads,
        MIXED=mixed_pass, UNITS_PER_BLOCK=units_per_block, UNIT_BYTES=unit_bytes,
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        DOT_DTYPE=dot_dtype(query.dtype), K_BIAS=code_bias(query.dtype, layout.k_bits),
        V_BIAS=code_bias(query.dtype, layout.v_bits),
        **layout.kernel_constants, num_warps=num_warps, num_stages=num_stages,
    )


def reduce_splits(split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out: torch.Tensor,
                  num_splits: int) -> torch.Tensor:
    """Merge the splits of every (sequence, query head), whichever kernel wrote them, into `out`
    [num_seqs, num_heads, head_size]."""
    num_seqs, num_heads, head_size = out.shape
    part_out, part_max, part_sum = split_buffers
    _reduce_splits_kernel[(num_seqs, num_heads)](
        part_out, part_max, part_sum, out, out.stride(0), out.stride(1), num_splits,
        SPLITS_PER_STEP=REDUCE_SPLITS_PER_STEP, HEAD_SIZE=head_size,
        num_warps=1,
    )
    return out
