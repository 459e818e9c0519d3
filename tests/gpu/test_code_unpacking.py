"""The bit-field unpacking the attention kernels feed their matmuls with on the GPU (page_format.py
`load_codes_operand`: inline PTX that turns four packed bytes into bf16 `bias + code` values at
once) against the plain unpacking (`unpack_codes`), at every tile shape the kernels load: K tiles
(block tokens x head channels) and V tiles (head channels x block tokens), 2 and 4 bits, the
block sizes users may set (rows under NARROW_ROW_BYTES take load_narrow_codes instead). The
interpreter cannot run PTX, so only a GPU exercises this path.

    pytest -m gpu tests/gpu/test_code_unpacking.py
"""

import pytest
import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.page_format import load_codes_operand, unpack_codes

pytestmark = pytest.mark.gpu

BIAS = tl.constexpr(128)
"""bf16's magic bias: the operand holds 128 + code (a constexpr, as Triton reads globals only so)."""


@triton.jit
def _unpack_both(page, fast_ptr, plain_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    fast = load_codes_operand(page, 0, ROWS, COLS, BITS, tl.bfloat16, BIAS)
    tl.store(fast_ptr + offs, fast.to(tl.float32) - BIAS)
    ROW_BYTES: tl.constexpr = COLS * BITS // 8
    packed = tl.load(page + tl.arange(0, ROWS)[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :])
    tl.store(plain_ptr + offs, unpack_codes(packed, ROWS, COLS, BITS).to(tl.float32))


@pytest.mark.parametrize("num_warps", [4, 8])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("rows", "cols"), [(16, 64), (64, 16), (16, 128), (128, 16), (32, 64), (64, 64),
                                            (64, 128), (128, 64)])
def test_the_fast_unpacking_equals_the_plain_one(rows, cols, bits, num_warps):
    packed = torch.randint(0, 256, (rows * cols * bits // 8,), dtype=torch.uint8, device="cuda")
    fast = torch.full((rows, cols), float("nan"), device="cuda")
    plain = torch.full_like(fast, float("nan"))
    _unpack_both[(1,)](packed, fast, plain, rows, cols, bits, num_warps=num_warps)
    # the plain unpacking, in PyTorch: first code in the lowest bits of each byte
    shifts = torch.arange(0, 8, bits, device="cuda", dtype=torch.uint8)
    expected = ((packed.view(rows, -1)[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(rows, cols).float()
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)
    torch.testing.assert_close(fast, expected, rtol=0, atol=0)
