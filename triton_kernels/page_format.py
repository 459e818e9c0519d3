"""Owns the compressed page format on the Triton side: pack/unpack codes, dequantize a block.

Mirrors `vllm_kvpress/layout.py` (byte offsets, passed in as constexprs from
`PageLayout.kernel_constants`, never recomputed here) and the PyTorch oracle
`vllm_kvpress/reference/page_codec.py` (same rounding, same order of operations).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def headwise_arguments(headwise, num_kv_heads: int, placeholder: torch.Tensor):
    """(row parameters, retrieval ranks, R) for a kernel's HEADWISE arguments, checked; with
    `headwise` None, placeholders the kernel never reads (HEADWISE off) and R = 0."""
    if headwise is None:
        return placeholder, placeholder, 0
    from vllm_kvpress.triton_kernels.checks import check_tensor

    row_params, retrieval, retrieval_heads = headwise
    check_tensor("headwise row parameters", row_params, dtype=torch.int32, shape=(None, 3))
    check_tensor("retrieval ranks", retrieval, dtype=torch.int32, shape=(num_kv_heads,))
    return row_params, retrieval, retrieval_heads


def dot_dtype(torch_dtype: torch.dtype):
    """Operand type of the attention matmuls: the query dtype on the GPU. Under TRITON_INTERPRET
    the interpreter's bf16 `tl.dot` returns garbage (Triton 3.6), so the CPU tests use fp32."""
    if INTERPRETER:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[torch_dtype]


MAGIC_BIAS = {torch.bfloat16: 128, torch.float16: 1024}
"""A code c becomes the float (bias + c) by OR-ing it into the bit pattern of `bias` (0x4300 in
bf16, 0x6400 in fp16): exact for c < bias's ulp range (bf16: 7 bits, fp16: 10 bits), one logic op
instead of an int-to-float conversion; the kernels subtract bias * sum(operand) afterwards."""


def code_bias(torch_dtype: torch.dtype, bits: int) -> int:
    """The magic bias for `bits`-bit codes in dot operands of `torch_dtype`, or 0 (plain conversion)."""
    if INTERPRETER:  # the interpreter cannot bitcast integers to bf16 reliably
        return 0
    bias = MAGIC_BIAS[torch_dtype]
    return bias if (1 << bits) <= (bias if torch_dtype == torch.float16 else 128) else 0


@triton.jit
def headwise_row(headwise_ptr, retrieval_ptr, seq, kv_head, BLOCK_SIZE: tl.constexpr):
    """(K, n, M) of a head-wise packed row, the KV head's retrieval rank (-1: not one) and how many
    more tokens than the view's length the head attends to (negative: the M middle blocks it skips)."""
    kept = tl.load(headwise_ptr + 3 * seq)
    chunks = tl.load(headwise_ptr + 3 * seq + 1)
    middle = tl.load(headwise_ptr + 3 * seq + 2)
    retrieval = tl.load(retrieval_ptr + kv_head)
    return kept, chunks, middle, retrieval, (tl.where(retrieval >= 0, chunks, 0) - middle) * BLOCK_SIZE


@triton.jit
def headwise_block(b, kv_head, retrieval, kept, chunks, middle, RETRIEVAL_HEADS: tl.constexpr, num_kv_heads):
    """(view block, head slot) of the head's logical block b in a head-wise packed request
    (vllm_kvpress/eviction/headwise.py `logical_block_location`, the oracle)."""
    in_middle = (retrieval >= 0) & (b >= kept) & (b < kept + chunks)
    unit = (b - kept) * RETRIEVAL_HEADS + retrieval
    after = tl.where(retrieval >= 0, b - chunks + middle, b + middle)
    view_block = tl.where(b < kept, b, tl.where(in_middle, kept + unit // num_kv_heads, after))
    return view_block, tl.where(in_middle, unit % num_kv_heads, kv_head)


MIXED_OFF = tl.constexpr(0)
MIXED_HIGH = tl.constexpr(1)
MIXED_LOW = tl.constexpr(2)
"""A kernel's MIXED pass over mixed-precision rows (vllm_kvpress/mixed_layout.py): off (no row is
mixed), the high-precision blocks of every row (important ones, then the tail; a row that is not
mixed reads as usual), or the low-precision units of the mixed rows."""


def mixed_arguments(mixed, placeholder: torch.Tensor):
    """(row parameters, U, unit bytes) for a kernel's MIXED arguments, checked; with `mixed` None,
    a placeholder the kernel never reads and zeros."""
    if mixed is None:
        return placeholder, 0, 0
    from vllm_kvpress.triton_kernels.checks import check_tensor

    row_params, low_layout, units_per_block = mixed
    check_tensor("mixed row parameters", row_params, dtype=torch.int32, shape=(None, 3))
    return row_params, units_per_block, low_layout.bytes_per_head


@triton.jit
def packed_row(rows_ptr, seq):
    """(K, n, M) of a row whose blocks after the K every-head ones are packed (0, 0, 0: not packed)."""
    return tl.load(rows_ptr + 3 * seq), tl.load(rows_ptr + 3 * seq + 1), tl.load(rows_ptr + 3 * seq + 2)


@triton.jit
def mixed_high_block(b, kept, middle):
    """View block of the high pass's logical block b of a mixed-precision row: the K important
    blocks, then (past the M blocks of low-precision units) the tail; b itself in a row not split."""
    return tl.where(b < kept, b, b + middle)


@triton.jit
def mixed_unit(c, kv_head, kept, num_kv_heads, UNITS_PER_BLOCK: tl.constexpr, UNIT_BYTES: tl.constexpr):
    """(view block, byte offset in the block) of low-precision chunk c of a KV head
    (vllm_kvpress/mixed_layout.py `LowPrecisionPacking.unit_location`, the oracle)."""
    unit = c * num_kv_heads + kv_head
    return kept + unit // UNITS_PER_BLOCK, (unit % UNITS_PER_BLOCK) * UNIT_BYTES


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
        codes = interleave_fields2(x & 0xF, x >> 4, ROWS, COLS)
    else:
        codes = interleave_fields4(x & 0x3, (x >> 2) & 0x3, (x >> 4) & 0x3, x >> 6, ROWS, COLS)
    return codes


@triton.jit
def interleave_fields2(c0, c1, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Fields [ROWS, COLS // 2] of each byte (low first) -> [ROWS, COLS]: field k of byte j at 2j + k."""
    return tl.reshape(tl.join(c0, c1), (ROWS, COLS))


@triton.jit
def interleave_fields4(c0, c1, c2, c3, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Fields [ROWS, COLS // 4] of each byte (low first) -> [ROWS, COLS]: field k of byte j at 4j + k."""
    # join(join(c0, c2), join(c1, c3)) puts field k of byte j at 4 * j + k after the reshape
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (ROWS, COLS))


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


NARROW_ROW_BYTES = tl.constexpr(16)
"""Packed rows shorter than this are unpacked by `load_narrow_codes`. On an H100 (Triton 3.6) the
join-and-reshape unpacking gave wrong codes inside the decode kernel for V tiles of 16-token blocks
(rows of 4 or 8 bytes; errors of 10-100 in the output) though the same function alone was exact;
rows of 16 bytes and more (32-token blocks and up, every K tile) were exact."""


@triton.jit
def load_narrow_codes(page, CODES_OFF: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """Codes int32 [ROWS, COLS] read one code per lane: each lane loads its code's byte (neighbours
    share it through the cache) and shifts its field down; no join or reshape."""
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    ROW_BYTES: tl.constexpr = COLS * BITS // 8
    cols = tl.arange(0, COLS)
    offs = tl.arange(0, ROWS)[:, None] * ROW_BYTES + (cols // CODES_PER_BYTE)[None, :]
    byte = tl.load(page + CODES_OFF + offs).to(tl.int32)
    return (byte >> ((cols % CODES_PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def load_codes(page, CODES_OFF: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """Codes of a whole block of one tensor as stored, int32 [ROWS, COLS]: K is (tokens, channels),
    V is (channels, tokens)."""
    ROW_BYTES: tl.constexpr = COLS * BITS // 8
    if ROW_BYTES < NARROW_ROW_BYTES:
        codes = load_narrow_codes(page, CODES_OFF, ROWS, COLS, BITS)
    else:
        offs = tl.arange(0, ROWS)[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]
        codes = unpack_codes(tl.load(page + CODES_OFF + offs), ROWS, COLS, BITS)
    return codes


@triton.jit
def codes_as_operand(codes, DOT_DTYPE: tl.constexpr, BIAS: tl.constexpr):
    """int32 codes -> dot operand holding exactly BIAS + code (see MAGIC_BIAS)."""
    if BIAS == 128:
        operand = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif BIAS == 1024:
        operand = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        operand = codes.to(DOT_DTYPE)
    return operand


def _field_asm(shift: int, bits: int, magic: int) -> tl.constexpr:
    mask = (1 << bits) - 1
    return tl.constexpr(
        f"{{ .reg .b32 z, t; mov.b32 z, 0; shr.b32 t, $2, {shift};"
        f" prmt.b32 $0, t, z, 0x4140; prmt.b32 $1, t, z, 0x4342;"
        f" lop3.b32 $0, $0, 0x{mask:04x}{mask:04x}, 0x{magic:04x}{magic:04x}, 0xEA;"
        f" lop3.b32 $1, $1, 0x{mask:04x}{mask:04x}, 0x{magic:04x}{magic:04x}, 0xEA; }}"
    )


# (bits, shift) -> PTX, for bf16 (magic 0x4300 = 128.0) and fp16 (0x6400 = 1024.0) operands
_BF16_4_0, _BF16_4_4 = _field_asm(0, 4, 0x4300), _field_asm(4, 4, 0x4300)
_FP16_4_0, _FP16_4_4 = _field_asm(0, 4, 0x6400), _field_asm(4, 4, 0x6400)
_BF16_2_0, _BF16_2_2, _BF16_2_4, _BF16_2_6 = (_field_asm(s, 2, 0x4300) for s in (0, 2, 4, 6))
_FP16_2_0, _FP16_2_2, _FP16_2_4, _FP16_2_6 = (_field_asm(s, 2, 0x6400) for s in (0, 2, 4, 6))


@triton.jit
def field_as_operand(packed, SHIFT: tl.constexpr, BITS: tl.constexpr, BIAS: tl.constexpr):
    """Bit field [SHIFT, SHIFT + BITS) of every byte of uint8 `packed` -> BIAS + field in bf16/fp16.

    Four bytes at a time (one 32-bit register in, two bf16x2 out): prmt spreads bytes 0,1 (and
    2,3) into the low byte of each 16-bit half, lop3 masks the field and ORs in the bit pattern of
    BIAS. Two instructions per two codes (plus one shift per four), instead of a per-byte extract,
    mask and int-to-float conversion.
    """
    tl.static_assert(BITS == 2 or BITS == 4, "fields are 2 or 4 bits")
    tl.static_assert(BIAS == 128 or BIAS == 1024, "BIAS selects bf16 (128) or fp16 (1024)")
    if BIAS == 128:
        if BITS == 4:
            asm: tl.constexpr = _BF16_4_0 if SHIFT == 0 else _BF16_4_4
        else:
            asm: tl.constexpr = (_BF16_2_0 if SHIFT == 0 else _BF16_2_2 if SHIFT == 2
                                 else _BF16_2_4 if SHIFT == 4 else _BF16_2_6)
        result = tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        if BITS == 4:
            asm: tl.constexpr = _FP16_4_0 if SHIFT == 0 else _FP16_4_4
        else:
            asm: tl.constexpr = (_FP16_2_0 if SHIFT == 0 else _FP16_2_2 if SHIFT == 2
                                 else _FP16_2_4 if SHIFT == 4 else _FP16_2_6)
        result = tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True, pack=4)
    return result


@triton.jit
def load_codes_operand(page, CODES_OFF: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                       BITS: tl.constexpr, DOT_DTYPE: tl.constexpr, BIAS: tl.constexpr):
    """A block's codes as a dot operand [ROWS, COLS] holding BIAS + code (BIAS 0: plain conversion)."""
    ROW_BYTES: tl.constexpr = COLS * BITS // 8
    if BIAS == 0 or BITS == 8 or ROW_BYTES < NARROW_ROW_BYTES:  # (narrow rows: load_codes reads them per lane)
        operand = codes_as_operand(load_codes(page, CODES_OFF, ROWS, COLS, BITS), DOT_DTYPE, BIAS)
    else:
        packed = tl.load(page + CODES_OFF + tl.arange(0, ROWS)[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :])
        if BITS == 4:
            operand = interleave_fields2(field_as_operand(packed, 0, 4, BIAS), field_as_operand(packed, 4, 4, BIAS),
                                         ROWS, COLS)
        else:
            operand = interleave_fields4(field_as_operand(packed, 0, 2, BIAS), field_as_operand(packed, 2, 2, BIAS),
                                         field_as_operand(packed, 4, 2, BIAS), field_as_operand(packed, 6, 2, BIAS),
                                         ROWS, COLS)
    return operand


@triton.jit
def broadcast_groups(per_group, ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """[ROWS, GROUPS] -> [ROWS, GROUPS * GROUP]: each group's value repeated over its channels."""
    return tl.reshape(tl.broadcast_to(per_group[:, :, None], (ROWS, GROUPS, GROUP)), (ROWS, GROUPS * GROUP))


@triton.jit
def load_outliers(page, SPARSE_OFF: tl.constexpr, NUM_OUTLIERS: tl.constexpr, HEAD_SIZE: tl.constexpr):
    """A block's sparse slots: (token, channel) int32 [NUM_OUTLIERS] each, value fp32 (0 in empty slots)."""
    slots = tl.arange(0, NUM_OUTLIERS)
    index = tl.load(int16_ptr(page + SPARSE_OFF) + slots).to(tl.int32)
    value = tl.load(fp16_ptr(page + SPARSE_OFF + 2 * NUM_OUTLIERS) + slots).to(tl.float32)
    return index // HEAD_SIZE, index % HEAD_SIZE, value


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
        token, channel, value = load_outliers(page, SPARSE_OFF, NUM_OUTLIERS, HEAD_SIZE)
        # one-hot product scatters the slots: x[t_i, c_i] += value_i (empty slots hold value 0)
        by_token = tl.where(token[None, :] == rows[:, None], value[None, :], 0.0)
        by_channel = (channel[:, None] == cols[None, :]).to(tl.float16)
        x += tl.dot(by_token.to(tl.float16), by_channel)
    return x


@triton.jit
def load_block_k(page, complete, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr,
                 K_STAGE_GROUP: tl.constexpr, K_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr,
                 K_LOWRANK_OFF: tl.constexpr, K_SPARSE_OFF: tl.constexpr, RANK: tl.constexpr,
                 NUM_OUTLIERS: tl.constexpr):
    """Dequantized K of one head's block, fp32 [BLOCK_SIZE, HEAD_SIZE].

    `complete` (runtime bool): per-channel scales + GEAR terms; else symmetric staging scales.
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
        k = dequantize_staged_k(codes, meta, BLOCK_SIZE, HEAD_SIZE, K_BITS, K_STAGE_GROUP)
    return k


@triton.jit
def dequantize_staged_k(codes, meta, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr,
                        K_STAGE_GROUP: tl.constexpr):
    """K of a partial block from fp32 codes [BLOCK_SIZE, HEAD_SIZE]: (code - qmax/2) * group scale."""
    GROUPS: tl.constexpr = HEAD_SIZE // K_STAGE_GROUP
    QMAX: tl.constexpr = (1 << K_BITS) - 1
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    scale = broadcast_groups(tl.load(meta + offs).to(tl.float32), BLOCK_SIZE, GROUPS, K_STAGE_GROUP)
    return (codes - QMAX * 0.5) * scale


@triton.jit
def load_block_v(page, complete, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, V_BITS: tl.constexpr,
                 V_GROUP: tl.constexpr, V_CODES_OFF: tl.constexpr, V_META_OFF: tl.constexpr,
                 V_LOWRANK_OFF: tl.constexpr, V_SPARSE_OFF: tl.constexpr,
                 RANK: tl.constexpr, NUM_OUTLIERS: tl.constexpr):
    """Dequantized V of one head's block, fp32 [BLOCK_SIZE, HEAD_SIZE] (GEAR terms if complete)."""
    GROUPS: tl.constexpr = HEAD_SIZE // V_GROUP
    # V codes are stored channel-major (packed along tokens)
    codes = tl.trans(load_codes(page, V_CODES_OFF, HEAD_SIZE, BLOCK_SIZE, V_BITS)).to(tl.float32)
    meta = fp16_ptr(page + V_META_OFF)
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    scale = broadcast_groups(tl.load(meta + offs).to(tl.float32), BLOCK_SIZE, GROUPS, V_GROUP)
    zero = broadcast_groups(tl.load(meta + BLOCK_SIZE * GROUPS + offs).to(tl.float32), BLOCK_SIZE, GROUPS, V_GROUP)
    v = codes * scale + zero
    if RANK > 0 or NUM_OUTLIERS > 0:
        if complete:
            v = add_gear_terms(v, page, V_LOWRANK_OFF, V_SPARSE_OFF, BLOCK_SIZE, HEAD_SIZE, RANK, NUM_OUTLIERS)
    return v
