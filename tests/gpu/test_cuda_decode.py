"""The CUDA decode kernel (csrc/decode_attention.cu) against reference paged attention and the
Triton kernel, on pages the Triton write kernel filled, at the shapes it takes: GQA groups 1-8,
head sizes 64 and 128, 2- and 4-bit codes, block sizes 32-128, GEAR's terms, bf16 and fp16 queries.
Run on the GPU machine: pytest -m gpu tests/gpu."""

import pytest
import torch
from helpers import layout_for, make_batch, write_batch
from vllm_kvpress.triton_kernels.decode_attention import decode_attention, decode_kernel, split_buffers

from vllm_kvpress import cuda_decode
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention

pytestmark = pytest.mark.gpu

# (method, settings, heads, kv_heads, head_size)
CASES = [
    ("kivi", {"bits": 4}, 32, 8, 128),  # Llama-3.1-8B, two V groups
    ("gear", {"bits": 4}, 32, 8, 128),  # rank 1, 16 outlier slots
    ("gear", {"bits": 2}, 9, 3, 64),  # SmolLM2-135M
    ("kivi", {"bits": 2, "group_size": "head"}, 14, 2, 64),  # Qwen2.5-0.5B
    ("gear", {"bits": 4, "block_size": 128, "outliers": 32}, 8, 8, 128),
    ("kivi", {"bits": 4, "block_size": 32}, 64, 8, 128),
    ("gear", {"bits": 2, "outliers": 0}, 16, 4, 128),
]
# decodes over partial blocks, one ending exactly on a block, one shorter than a block
CONTEXT_LENS = [3000, 777, 1279, 5, 4095]
TOL = dict(atol=2e-2, rtol=1.6e-2)


def _decode(method, settings, heads, kv_heads, head_size, dtype, num_splits, q_scale=1.0):
    """(layout, {kernel: output}, reference) of one decode step over CONTEXT_LENS."""
    layout, iters = layout_for(method, head_size, **settings)
    batch = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), kv_heads, head_size, layout.block_size, device="cuda")
    cache, k_new, v_new = write_batch(batch, layout, iters)
    q = (torch.randn(len(CONTEXT_LENS), heads, head_size, device="cuda") * q_scale).to(dtype)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device="cuda")
    out = {}
    for name in ("cuda", "triton"):
        out[name] = torch.full_like(q, float("nan"))
        decode_attention(q, cache, batch.block_table, seq_lens, out[name], layout, scale=head_size ** -0.5,
                         num_splits=num_splits, split_buffers=split_buffers(len(CONTEXT_LENS) * num_splits, heads,
                                                                            head_size, "cuda"), kernel=name)
    expected = paged_attention(q, k_new, v_new, list(range(len(CONTEXT_LENS) + 1)), batch.seq_lens,
                               lambda i, s: page_codec.read_sequence(cache, batch.block_table[i], s, layout),
                               head_size ** -0.5)
    return layout, out, expected


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_decode_matches_the_reference(method, settings, heads, kv_heads, head_size, dtype):
    layout, out, expected = _decode(method, settings, heads, kv_heads, head_size, dtype, 3)
    assert decode_kernel(layout, heads // kv_heads, dtype, torch.device("cuda"))[0] == "cuda"
    torch.testing.assert_close(out["cuda"].float(), expected, **TOL)
    torch.testing.assert_close(out["triton"].float(), expected, **TOL)


@pytest.mark.parametrize("num_splits", [1, 7])
def test_cuda_decode_is_exact_across_splits(num_splits):
    """More splits than a sequence has blocks leaves CTAs and warps empty: they must merge as nothing."""
    _, out, expected = _decode("gear", {"bits": 4}, 32, 8, 128, torch.bfloat16, num_splits)
    torch.testing.assert_close(out["cuda"].float(), expected, **TOL)


def test_outlier_sums_rescale_when_the_max_grows(monkeypatch):
    """The V outlier sums are kept against a reference max and rescaled once the running max grew
    past RESCALE_LIMIT; with the limit at 0 and sharp attention every block takes that path."""
    defines = cuda_decode.kernel_defines
    monkeypatch.setattr(cuda_decode, "kernel_defines", lambda *a: (*defines(*a), "-DRESCALE_LIMIT=0.0f"))
    cuda_decode.build.cache_clear()
    try:
        _, out, expected = _decode("gear", {"bits": 4}, 32, 8, 128, torch.bfloat16, 2, q_scale=3.0)
    finally:
        cuda_decode.build.cache_clear()
    torch.testing.assert_close(out["cuda"].float(), expected, **TOL)
