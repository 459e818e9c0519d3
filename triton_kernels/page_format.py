"""Owns the compressed page format on the Triton side: pack/unpack codes, dequantize a block.

Mirrors `vllm_kvpress/layout.py` (byte offsets, passed in as constexprs from
`PageLayout.kernel_constants()`, never recomputed here) and the PyTorch oracle
`vllm_kvpress/reference/page_codec.py` (same rounding, same order of operations).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(torch_dtype: torch.dtype):
    """Operand type of the attention matmuls: the query dtype on the GPU. Under TRITON_INTERPRET
    the interpreter's bf16 `tl.dot` returns garbage (Triton 3.6), so the CPU tests use fp32."""
    if INTERPRETER:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[torch_dtype]

@triton.jit
def fp16_ptr(byte_ptr):
    return byte_ptr.to(tl.pointer_type(tl.float16))


@triton.jit
def int16_ptr(byte_ptr):
    return byte_ptr.to(tl.pointer_type(tl.int16))


@triton.jit
def unpack_codes(packed, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """uint8 [ROWS, COLS * BITS // 8] -> int32 codes [ROWS, COLS]; first code in the lowest bits."""
    tl.static_assert(BITS == 2 or BITS == 4 or BITS == 8, "codes are 2, 4 or 8 bits")
    x = packed.to(tl.int32)
    if BITS == 8:
        codes = x
    elif BITS == 4:
        codes = tl.reshape(tl.join(x & 0xF, x >> 4), (ROWS, COLS))
    else:
        # join(join(c0, c2), join(c1, c3)) puts code k of byte j at 4 * j + k after the reshape
        c0, c1, c2, c3 = x & 0x3, (x >> 2) & 0x3, (x >> 4) & 0x3, x >> 6
        codes = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (ROWS, COLS))
    return codes


@triton.jit
def pack_codes(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, COLS] -> uint8 [ROWS, COLS * BITS // 8]; inverse of unpack_codes."""
    tl.static_assert(BITS == 2 or BITS == 4 or BITS == 8, "codes are 2, 4 or 8 bits")
    if BITS == 8:
        packed = codes
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(codes, (ROWS, COLS // 2, 2)))
        packed = lo | (hi << 4)
    else:
        even, odd = tl.split(tl.reshape(codes, (ROWS, COLS // 4, 2, 2)))
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        packed = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
    return packed.to(tl.uint8)


@triton.jit
def load_codes(page, CODES_OFF: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """Codes of a whole block of one tensor: int32 [ROWS (tokens), COLS (channels)]."""
    ROW_BYTES: tl.constexpr = COLS * BITS // 8
    offs = tl.arange(0, ROWS)[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]
    return unpack_codes(tl.load(page + CODES_OFF + offs), ROWS, COLS, BITS)


@triton.jit
def broadcast_groups(per_group, ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """[ROWS, GROUPS] -> [ROWS, GROUPS * GROUP]: each group's value repeated over its channels."""
    return tl.reshape(tl.broadcast_to(per_group[:, :, None], (ROWS, GROUPS, GROUP)), (ROWS, GROUPS * GROUP))


@triton.jit
def add_gear_terms(x, page, LOWRANK_OFF: tl.constexpr, SPARSE_OFF: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
                   RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr):
    """x [BLOCK_SIZE, HEAD_SIZE] fp32 + sum_r a_r b_r^T + sparse outliers (GEAR's L and S)."""
    rows = tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, HEAD_SIZE)
    lowrank = fp16_ptr(page + LOWRANK_OFF)
    for r in tl.static_range(RANK):
        a = tl.load(lowrank + r * BLOCK_SIZE + rows).to(tl.float32)
        b = tl.load(lowrank + RANK * BLOCK_SIZE + r * HEAD_SIZE + cols).to(tl.float32)
        x += a[:, None] * b[None, :]
    if NUM_OUTLIERS > 0:
        slots = tl.arange(0, NUM_OUTLIERS)
        index = tl.load(int16_ptr(page + SPARSE_OFF) + slots).to(tl.int32)
        value = tl.load(fp16_ptr(page + SPARSE_OFF + 2 * NUM_OUTLIERS) + slots)
        # one-hot product scatters the slots: x[t_i, c_i] += value_i (empty slots hold value 0)
        by_token = tl.where((index // HEAD_SIZE)[None, :] == rows[:, None], value[None, :], 0.0)
        by_channel = ((index % HEAD_SIZE)[:, None] == cols[None, :]).to(tl.float16)
        x += tl.dot(by_token.to(tl.float16), by_channel)
    return x


@triton.jit
def load_block_k(page, complete, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr,
                 K_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr, K_LOWRANK_OFF: tl.constexpr,
                 K_SPARSE_OFF: tl.constexpr, RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr):
    """Dequantized K of one head's block, fp32 [BLOCK_SIZE, HEAD_SIZE].

    `complete` (runtime bool): per-channel scales + GEAR terms; else per-token staging scales.
    """
    codes = load_codes(page, K_CODES_OFF, BLOCK_SIZE, HEAD_SIZE, K_BITS).to(tl.float32)
    meta = fp16_ptr(page + K_META_OFF)
    # The compiler needs every name assigned in both branches to have one type: only `k` is shared.
    if complete:
        cols = tl.arange(0, HEAD_SIZE)
        channel_scale = tl.load(meta + cols).to(tl.float32)
        channel_zero = tl.load(meta + HEAD_SIZE + cols).to(tl.float32)
        k = codes * channel_scale[None, :] + channel_zero[None, :]
        if RANK > 0 or NUM_OUTLIERS > 0:
            k = add_gear_terms(k, page, K_LOWRANK_OFF, K_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, RANK, NUM_OUTLIERS)
    else:
        rows = tl.arange(0, BLOCK_SIZE)
        token_scale = tl.load(meta + rows).to(tl.float32)
        token_zero = tl.load(meta + BLOCK_SIZE + rows).to(tl.float32)
        k = codes * token_scale[:, None] + token_zero[:, None]
    return k


@triton.jit
def load_block_v(page, complete, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, V_BITS: tl.constexpr,
                 V_GROUP: tl.constexpr, V_CODES_OFF: tl.constexpr, V_META_OFF: tl.constexpr,
                 V_LOWRANK_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr,
                 RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr):
    """Dequantized V of one head's block, fp32 [BLOCK_SIZE, HEAD_SIZE] (GEAR terms if complete)."""
    GROUPS: tl.constexpr = HEAD_SIZE // V_GROUP
    codes = load_codes(page, V_CODES_OFF, BLOCK_SIZE, HEAD_SIZE, V_BITS).to(tl.float32)
    meta = fp16_ptr(page + V_META_OFF)
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    scale = broadcast_groups(tl.load(meta + offs).to(tl.float32), BLOCK_SIZE, GROUPS, V_GROUP)
    zero = broadcast_groups(tl.load(meta + BLOCK_SIZE * GROUPS + offs).to(tl.float32), BLOCK_SIZE, GROUPS, V_GROUP)
    v = codes * scale + zero
    if RANK > 0 or NUM_OUTLIERS > 0:
        if complete:
            v = add_gear_terms(v, page, V_LOWRANK_OFF, V_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, RANK, NUM_OUTLIERS)
    return v
