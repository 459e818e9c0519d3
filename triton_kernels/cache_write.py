"""Owns the write path: quantize-pack-scatter of new K/V into compressed pages (vLLM's cache update).

Two kernels, split by what happens to a token's block:
- `_stage_tokens_kernel`, grid (token, kv head): the block stays partial after this write. The
  token is quantized on its own (K over its whole head, V per group) into the staging form; with
  an exact tail (`triton_kernels/exact_tail.py`) its K is stored there exactly instead.
- `_encode_blocks_kernel`, grid (completed block, kv head, K or V): this write fills the block.
  The program gathers the whole block (new tokens exact from the input, older ones dequantized
  from staging, or exact from the tail) and encodes it: per-channel K, per-token V, GEAR outliers
  and low-rank terms. Its grid is the list of completing tokens (`completing_tokens`), not every
  token: a complete GEAR encode is long, and idle programs of its size would still occupy the
  multiprocessors.
They touch disjoint blocks, but a request's tail holds one block: the block a write completes reads
its older keys from the tail slot that the write's new partial block overwrites, so the encode runs
first. The PyTorch oracle is `vllm_kvpress.reference.page_codec.write_tokens`.
"""

import functools

import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.checks import check_tensor
from vllm_kvpress.triton_kernels.exact_tail import load_tail_k, tail_arguments, tail_rows
from vllm_kvpress.triton_kernels.page_format import (
    fp16_ptr,
    int16_ptr,
    load_block_k,
    load_block_v,
    pack_codes,
)

from vllm_kvpress.encoding import GOLDEN, POWER_ITER_EPS, ZSCORE_EPS
from vllm_kvpress.layout import PageLayout

_GOLDEN = tl.constexpr(GOLDEN)
_ZSCORE_EPS = tl.constexpr(ZSCORE_EPS)
_POWER_ITER_EPS = tl.constexpr(POWER_ITER_EPS)
_SEARCH_WAYS = tl.constexpr(4)
_SEARCH_STEPS = tl.constexpr(16)
"""Outlier threshold search over the bit patterns of z (z >= 0, so they order like the values): each
step counts the entries above 4 evenly spaced candidates in one reduction and keeps a quarter of
the interval, so 16 steps narrow [-1, 2^31) to the exact (n+1)-th largest z."""


@triton.jit
def quantize(x, lo, hi, BITS: tl.constexpr):
    """Asymmetric codes of x for the range [lo, hi] (broadcast), against fp16-rounded scale/zero."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    scale = tl.math.div_rn(hi - lo, QMAX * 1.0).to(tl.float16).to(tl.float32)
    zero = lo.to(tl.float16).to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    codes = tl.floor(tl.math.div_rn(x - zero, safe) + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), QMAX * 1.0)
    codes = tl.where(scale > 0, codes, 0.0)
    return codes.to(tl.int32), scale, zero


@triton.jit
def quantize_symmetric(x, amax, BITS: tl.constexpr):
    """Codes over [-amax, amax] (broadcast) with only an fp16 scale stored: x ~ (code - qmax/2) * scale."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    scale = tl.math.div_rn(2.0 * amax, QMAX * 1.0).to(tl.float16).to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    codes = tl.floor(tl.math.div_rn(x, safe) + QMAX * 0.5 + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), QMAX * 1.0)
    codes = tl.where(scale > 0, codes, QMAX // 2)
    return codes.to(tl.int32), scale


@triton.jit
def store_codes(page, codes, row, CODES_OFF: tl.constexpr, ROWS: tl.constexpr,
                COLS: tl.constexpr, BITS: tl.constexpr):
    """Pack int32 codes [ROWS, COLS] and store them from token row `row` on."""
    ROW_BYTES: tl.constexpr = COLS * BITS // 8
    offs = (row + tl.arange(0, ROWS))[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]
    tl.store(page + CODES_OFF + offs, pack_codes(codes, ROWS, COLS, BITS))


@triton.jit(do_not_specialize=["num_tokens"])  # varies every step: one compile for all
def _stage_tokens_kernel(
    key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    cache_ptr, stride_cb, stride_ch, slot_mapping_ptr, tail_ptr, stride_ts, stride_th, tail_slots_ptr, num_tokens,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, K_STAGE_GROUP: tl.constexpr, EXACT_TAIL: tl.constexpr, K_CODES_OFF: tl.constexpr,
    V_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr, V_META_OFF: tl.constexpr,
):
    """Grid (num_tokens, num_kv_heads): stage one token of a block that stays partial."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    t_last = t + (BLOCK_SIZE - 1 - off)
    last_slot = tl.load(slot_mapping_ptr + t_last, mask=t_last < num_tokens, other=-1)
    if last_slot == block * BLOCK_SIZE + BLOCK_SIZE - 1:
        return  # this write completes the block: the finalize kernel encodes it whole
    page = cache_ptr + block * stride_cb + h * stride_ch
    cols = tl.arange(0, HEAD_SIZE)
    k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + cols)
    if EXACT_TAIL:  # the key as computed, in the tail's (the model's) dtype
        rows = tail_rows(tail_ptr, stride_ts, stride_th, tl.load(tail_slots_ptr + t), h)
        tl.store(rows + off * HEAD_SIZE + cols, k.to(tail_ptr.dtype.element_ty))
    else:
        K_GROUPS: tl.constexpr = HEAD_SIZE // K_STAGE_GROUP
        k_groups = tl.reshape(k.to(tl.float32), (K_GROUPS, K_STAGE_GROUP))
        k_codes, k_scale = quantize_symmetric(k_groups, tl.max(tl.abs(k_groups), 1)[:, None], K_BITS)
        store_codes(page, tl.reshape(k_codes, (1, HEAD_SIZE)), off, K_CODES_OFF, 1, HEAD_SIZE, K_BITS)
        kg = tl.arange(0, K_GROUPS)
        tl.store(fp16_ptr(page + K_META_OFF) + off * K_GROUPS + kg, tl.reshape(k_scale, (K_GROUPS,)).to(tl.float16))

    # V bytes hold TOKENS_PER_BYTE neighbouring tokens of one channel: the program of the first new
    # token of each byte writes the whole byte (read-modify-write), so no two programs race on it.
    TOKENS_PER_BYTE: tl.constexpr = 8 // V_BITS
    byte_start = off - off % TOKENS_PER_BYTE
    prev_slot = tl.load(slot_mapping_ptr + t - 1, mask=t > 0, other=-1)
    if (off == byte_start) | (prev_slot != slot - 1):
        GROUPS: tl.constexpr = HEAD_SIZE // V_GROUP
        j = tl.arange(0, TOKENS_PER_BYTE)
        src = t + byte_start + j - off
        src_slot = tl.load(slot_mapping_ptr + src, mask=(src >= 0) & (src < num_tokens), other=-1)
        is_new = src_slot == block * BLOCK_SIZE + byte_start + j
        src64 = tl.where(is_new, src, 0).to(tl.int64)
        v = tl.load(value_ptr + src64[:, None] * stride_vt + h * stride_vh + cols[None, :], mask=is_new[:, None],
                    other=0.0).to(tl.float32)
        v_groups = tl.reshape(v, (TOKENS_PER_BYTE, GROUPS, V_GROUP))
        v_codes, v_scale, v_zero = quantize(v_groups, tl.min(v_groups, 2)[:, :, None], tl.max(v_groups, 2)[:, :, None],
                                            V_BITS)
        field = tl.reshape(v_codes, (TOKENS_PER_BYTE, HEAD_SIZE)) << (j * V_BITS)[:, None]
        new_bits = tl.sum(tl.where(is_new[:, None], field, 0), 0)
        keep = tl.sum(tl.where(is_new, 0, ((1 << V_BITS) - 1) << (j * V_BITS)), 0)
        TOKEN_BYTES: tl.constexpr = BLOCK_SIZE * V_BITS // 8
        byte_ptr = page + V_CODES_OFF + cols * TOKEN_BYTES + byte_start // TOKENS_PER_BYTE
        tl.store(byte_ptr, ((tl.load(byte_ptr).to(tl.int32) & keep) | new_bits).to(tl.uint8))
        v_meta = fp16_ptr(page + V_META_OFF)
        meta_offs = (byte_start + j)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
        tl.store(v_meta + meta_offs, tl.reshape(v_scale, (TOKENS_PER_BYTE, GROUPS)).to(tl.float16),
                 mask=is_new[:, None])
        tl.store(v_meta + BLOCK_SIZE * GROUPS + meta_offs, tl.reshape(v_zero, (TOKENS_PER_BYTE, GROUPS)).to(tl.float16),
                 mask=is_new[:, None])


@triton.jit
def outlier_zscores(x, IS_KEY: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
                    V_GROUP: tl.constexpr):
    """|x - mean_g| / std_g in each quantization group: K channels (over tokens), V token groups."""
    if IS_KEY:
        dev = x - (tl.sum(x, 0) / BLOCK_SIZE)[None, :]
        std = tl.sqrt(tl.sum(dev * dev, 0) / BLOCK_SIZE)
        z = tl.abs(dev) / (std + _ZSCORE_EPS)[None, :]
    else:
        GROUPS: tl.constexpr = HEAD_SIZE // V_GROUP
        x3 = tl.reshape(x, (BLOCK_SIZE, GROUPS, V_GROUP))
        dev = x3 - (tl.sum(x3, 2) / V_GROUP)[:, :, None]
        std = tl.sqrt(tl.sum(dev * dev, 2) / V_GROUP)
        z = tl.reshape(tl.abs(dev) / (std + _ZSCORE_EPS)[:, :, None], (BLOCK_SIZE, HEAD_SIZE))
    return z


@triton.jit
def select_outliers(z, NUM_OUTLIERS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr):
    """Entries with z above the (n+1)-th largest z (at most n): the smallest bit pattern `hi` with at
    most n patterns above it is that z's. The search counts over the entries in any order (one
    flat reduction per step, the cheapest cross-warp form): a block encode waits on each step."""
    bits = z.to(tl.int32, bitcast=True)
    flat = tl.reshape(bits, (BLOCK_SIZE * HEAD_SIZE,), can_reorder=True)
    lo = tl.full((), -1, tl.int32)  # more than n patterns above it
    hi = tl.max(flat, 0)  # none above it
    ways = tl.arange(0, _SEARCH_WAYS) + 1
    for _ in range(_SEARCH_STEPS):
        # candidates lo + (hi - lo) * w / 4 for w = 1..4; the last is hi itself
        cand = lo + ((hi - lo).to(tl.int64) * ways // _SEARCH_WAYS).to(tl.int32)
        above = tl.sum((flat[:, None] > cand[None, :]).to(tl.int32), 0)
        fits = above <= NUM_OUTLIERS  # False ... True along the candidates
        new_hi = tl.min(tl.where(fits, cand, hi), 0)
        lo = tl.max(tl.where(fits, lo, cand), 0)
        hi = new_hi
    return bits > hi


@triton.jit
def encode_block(x, page, IS_KEY: tl.constexpr, BITS: tl.constexpr, CODES_OFF: tl.constexpr,
                 META_OFF: tl.constexpr, LOWRANK_OFF: tl.constexpr, SPARSE_OFF: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, V_GROUP: tl.constexpr,
                 RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr, POWER_ITERS: tl.constexpr):
    """Encode a complete block of K (IS_KEY) or V, x fp32 [BLOCK_SIZE, HEAD_SIZE] (GEAR steps 1-4)."""
    rows = tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, HEAD_SIZE)
    if NUM_OUTLIERS > 0:
        outlier = select_outliers(outlier_zscores(x, IS_KEY, BLOCK_SIZE, HEAD_SIZE, V_GROUP), NUM_OUTLIERS,
                                  BLOCK_SIZE, HEAD_SIZE)
    else:
        outlier = tl.zeros((BLOCK_SIZE, HEAD_SIZE), dtype=tl.int1)
    meta = fp16_ptr(page + META_OFF)
    if IS_KEY:
        lo = tl.min(tl.where(outlier, float("inf"), x), 0)
        hi = tl.max(tl.where(outlier, float("-inf"), x), 0)
        empty = lo == float("inf")  # every entry of the group is an outlier
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
        codes, scale, zero = quantize(x, lo[None, :], hi[None, :], BITS)
        deq = codes.to(tl.float32) * scale + zero
        tl.store(meta + cols, tl.reshape(scale, (HEAD_SIZE,)).to(tl.float16))
        tl.store(meta + HEAD_SIZE + cols, tl.reshape(zero, (HEAD_SIZE,)).to(tl.float16))
    else:
        GROUPS: tl.constexpr = HEAD_SIZE // V_GROUP
        x3 = tl.reshape(x, (BLOCK_SIZE, GROUPS, V_GROUP))
        out3 = tl.reshape(outlier, (BLOCK_SIZE, GROUPS, V_GROUP))
        lo = tl.min(tl.where(out3, float("inf"), x3), 2)
        hi = tl.max(tl.where(out3, float("-inf"), x3), 2)
        empty = lo == float("inf")
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
        codes3, scale, zero = quantize(x3, lo[:, :, None], hi[:, :, None], BITS)
        deq = tl.reshape(codes3.to(tl.float32) * scale + zero, (BLOCK_SIZE, HEAD_SIZE))
        codes = tl.reshape(codes3, (BLOCK_SIZE, HEAD_SIZE))
        offs = rows[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
        tl.store(meta + offs, tl.reshape(scale, (BLOCK_SIZE, GROUPS)).to(tl.float16))
        tl.store(meta + BLOCK_SIZE * GROUPS + offs, tl.reshape(zero, (BLOCK_SIZE, GROUPS)).to(tl.float16))
    if IS_KEY:
        store_codes(page, codes, 0, CODES_OFF, BLOCK_SIZE, HEAD_SIZE, BITS)
    else:  # V is stored channel-major, packed along tokens
        store_codes(page, tl.trans(codes), 0, CODES_OFF, HEAD_SIZE, BLOCK_SIZE, BITS)

    residual = tl.where(outlier, 0.0, x - deq)
    lowrank_sum = tl.zeros((BLOCK_SIZE, HEAD_SIZE), dtype=tl.float32)
    lowrank = fp16_ptr(page + LOWRANK_OFF)
    for r in tl.static_range(RANK):
        b = ((cols + 1).to(tl.float32) * _GOLDEN) % 1.0 - 0.5
        for _ in tl.static_range(POWER_ITERS):
            b = tl.sum(residual * tl.sum(residual * b[None, :], 1)[:, None], 0)
            b = b / (tl.sqrt(tl.sum(b * b, 0)) + _POWER_ITER_EPS)
        a16 = tl.sum(residual * b[None, :], 1).to(tl.float16)
        b16 = b.to(tl.float16)
        tl.store(lowrank + r * BLOCK_SIZE + rows, a16)
        tl.store(lowrank + RANK * BLOCK_SIZE + r * HEAD_SIZE + cols, b16)
        outer = a16.to(tl.float32)[:, None] * b16.to(tl.float32)[None, :]
        residual -= outer
        lowrank_sum += outer

    if NUM_OUTLIERS > 0:
        flat = tl.reshape(outlier, (BLOCK_SIZE * HEAD_SIZE,)).to(tl.int32)
        slot = tl.cumsum(flat, 0) - 1  # row-major order of the selected entries
        count = tl.sum(flat, 0)
        position = tl.arange(0, BLOCK_SIZE * HEAD_SIZE)
        value = tl.reshape(x - deq - lowrank_sum, (BLOCK_SIZE * HEAD_SIZE,))
        index_ptr = int16_ptr(page + SPARSE_OFF)
        value_ptr = fp16_ptr(page + SPARSE_OFF + 2 * NUM_OUTLIERS)
        tl.store(index_ptr + slot, position.to(tl.int16), mask=flat > 0)
        tl.store(value_ptr + slot, value.to(tl.float16), mask=flat > 0)
        empty_slot = tl.arange(0, NUM_OUTLIERS)
        tl.store(index_ptr + empty_slot, tl.zeros((NUM_OUTLIERS,), tl.int16), mask=empty_slot >= count)
        tl.store(value_ptr + empty_slot, tl.zeros((NUM_OUTLIERS,), tl.float16), mask=empty_slot >= count)


@triton.jit
def _encode_blocks_kernel(
    key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    cache_ptr, stride_cb, stride_ch, slot_mapping_ptr, tokens_ptr, tail_ptr, stride_ts, stride_th, tail_slots_ptr,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, K_STAGE_GROUP: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr,
    EXACT_TAIL: tl.constexpr, POWER_ITERS: tl.constexpr, K_CODES_OFF: tl.constexpr, V_CODES_OFF: tl.constexpr,
    K_META_OFF: tl.constexpr,
    V_META_OFF: tl.constexpr, K_LOWRANK_OFF: tl.constexpr, V_LOWRANK_OFF: tl.constexpr,
    K_SPARSE_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr,
):
    """Grid (completions, num_kv_heads, 2): program (i, h, 0) encodes K and (i, h, 1) V of the
    block that input token tokens[i] completes (-1: no block)."""
    t = tl.load(tokens_ptr + tl.program_id(0))
    if t < 0:
        return
    h = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    page = cache_ptr + block * stride_cb + h * stride_ch
    rows = tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, HEAD_SIZE)
    # The token at block offset j is new in this write iff input row t - (BLOCK_SIZE-1-j) maps to it.
    src = t - (BLOCK_SIZE - 1) + rows
    src_slot = tl.load(slot_mapping_ptr + src, mask=src >= 0, other=-1)
    is_new = (src_slot == block * BLOCK_SIZE + rows)[:, None]
    src64 = tl.where(src >= 0, src, 0).to(tl.int64)[:, None]
    if tl.program_id(2) == 0:
        k_new = tl.load(key_ptr + src64 * stride_kt + h * stride_kh + cols[None, :], mask=is_new, other=0.0)
        if EXACT_TAIL:  # the block's older keys, exact, from its request's tail
            k_old = load_tail_k(tail_ptr, stride_ts, stride_th, tl.load(tail_slots_ptr + t), h, BLOCK_SIZE, HEAD_SIZE)
        else:
            k_old = load_block_k(page, False, BLOCK_SIZE, HEAD_SIZE, K_BITS, K_STAGE_GROUP, K_CODES_OFF, K_META_OFF,
                                 K_LOWRANK_OFF, K_SPARSE_OFF, RANK, NUM_OUTLIERS)
        encode_block(tl.where(is_new, k_new.to(tl.float32), k_old), page, True, K_BITS, K_CODES_OFF, K_META_OFF,
                     K_LOWRANK_OFF, K_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, V_GROUP, RANK, NUM_OUTLIERS, POWER_ITERS)
    else:
        v_new = tl.load(value_ptr + src64 * stride_vt + h * stride_vh + cols[None, :], mask=is_new, other=0.0)
        v_old = load_block_v(page, False, BLOCK_SIZE, HEAD_SIZE, V_BITS, V_GROUP, V_CODES_OFF, V_META_OFF,
                             V_LOWRANK_OFF, V_SPARSE_OFF, RANK, NUM_OUTLIERS)
        encode_block(tl.where(is_new, v_new.to(tl.float32), v_old), page, False, V_BITS, V_CODES_OFF, V_META_OFF,
                     V_LOWRANK_OFF, V_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, V_GROUP, RANK, NUM_OUTLIERS, POWER_ITERS)


STAGE_NUM_WARPS = 2
ENCODE_NUM_WARPS = 16
"""The encode program holds several fp32 [block_size, head_size] tiles: 16 warps keep GEAR's in 128
registers a thread without spilling (8 warps need 255), and the encode is latency-bound (a decode
step waits for its one block), so more threads per block is what counts."""


def max_completions(num_tokens: int, num_seqs: int, block_size: int) -> int:
    """At most how many blocks a write of `num_tokens` new tokens of `num_seqs` sequences completes:
    a sequence's q consecutive tokens end at most q // block_size + 1 blocks."""
    return max(1, min(num_tokens, num_tokens // block_size + num_seqs))


def completing_tokens(slot_mapping: torch.Tensor, block_size: int, num_completions: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [num_completions]: in input order, the rows of `slot_mapping` whose slot is a block's
    last offset (the write completes that block), then -1. GPU ops only (no host sync), so the
    metadata builder can fill its persistent buffer once per step for every layer. `out` has room
    for at least num_completions + 1 entries (the last one takes the other rows' scatter)."""
    if out is None:
        out = torch.empty(num_completions + 1, dtype=torch.int32, device=slot_mapping.device)
    out.fill_(-1)
    is_last = (slot_mapping >= 0) & (slot_mapping % block_size == block_size - 1)
    rank = torch.cumsum(is_last, 0) - 1
    dest = torch.where(is_last, rank, num_completions)
    rows = torch.arange(slot_mapping.shape[0], dtype=torch.int32, device=slot_mapping.device)
    out.scatter_(0, dest, torch.where(is_last, rows, -1))
    return out[:num_completions]


def write_kv_pages(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: PageLayout,
    *,
    power_iters: int = 1,
    completing: torch.Tensor | None = None,
    num_seqs: int | None = None,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write new K/V into compressed pages (vLLM's `do_kv_cache_update`).

    Args:
        key, value: [num_tokens, num_kv_heads, head_size] fp16/bf16 (rows beyond slot_mapping ignored).
        cache: uint8 [num_blocks, num_kv_heads, layout.bytes_per_head], updated in place.
        slot_mapping: int32/int64 [num_tokens'] block_id * block_size + offset, -1 = padding.
        layout: the page layout of this layer.
        power_iters: GEAR power-iteration steps (ignored when layout.rank == 0).
        completing: `completing_tokens(slot_mapping, ...)` of this write, where the caller has it
            (the metadata builder makes it once per step); else it is made here, bounded by
            `num_seqs` (the sequences the tokens belong to; default one per token).
        tail: with `layout.exact_tail_keys`: (the layer's exact tail, int32 [>= num_tokens'] each
            token's request-state slot), where partial blocks keep their keys (exact_tail.py).
    """
    num_tokens = slot_mapping.shape[0]
    num_kv_heads = cache.shape[1]
    check_tensor("key", key, dtype=(torch.float16, torch.bfloat16), ndim=3,
                 shape=(None, num_kv_heads, layout.head_size))
    check_tensor("value", value, dtype=key.dtype, shape=(None, num_kv_heads, layout.head_size))
    check_tensor("cache", cache, dtype=torch.uint8, shape=(None, num_kv_heads, layout.bytes_per_head))
    check_tensor("slot_mapping", slot_mapping, dtype=(torch.int32, torch.int64), ndim=1)
    if key.shape[0] < num_tokens:
        raise ValueError(f"Invalid shape of key: {key.shape[0]} rows for {num_tokens} slots")
    if num_tokens == 0:
        return
    if completing is None:
        bound = max_completions(num_tokens, num_tokens if num_seqs is None else num_seqs, layout.block_size)
        completing = completing_tokens(slot_mapping, layout.block_size, bound)
    tail_args = tail_arguments(tail, layout, slot_mapping)
    common = (key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
              cache, cache.stride(0), cache.stride(1), slot_mapping)
    # encode first: a completed block reads its older keys from the tail the new partial block overwrites
    _encode_blocks_kernel[(completing.shape[0], num_kv_heads, 2)](
        *common, completing, *tail_args, POWER_ITERS=power_iters if layout.rank else 1, **layout.kernel_constants,
        num_warps=ENCODE_NUM_WARPS,
    )
    _stage_tokens_kernel[(num_tokens, num_kv_heads)](*common, *tail_args, num_tokens, **_stage_constants(layout),
                                                    num_warps=STAGE_NUM_WARPS)


@functools.cache
def _stage_constants(layout: PageLayout) -> dict[str, int]:
    """The part of the layout the staging kernel takes (it has no GEAR regions)."""
    return {k: layout.kernel_constants[k] for k in (
        "BLOCK_SIZE", "HEAD_SIZE", "K_BITS", "V_BITS", "V_GROUP", "K_STAGE_GROUP", "EXACT_TAIL",
        "K_CODES_OFF", "V_CODES_OFF", "K_META_OFF", "V_META_OFF")}
