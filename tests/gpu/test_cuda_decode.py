"""The CUDA decode kernel (csrc/decode_attention.cu) against reference paged attention and the
Triton kernel, on pages the Triton write kernel filled, at the shapes it takes: GQA groups 1-8,
head sizes 64 and 128, 2- and 4-bit codes, block sizes 32-128, GEAR's terms, bf16 and fp16 queries.
Run on the GPU machine: pytest -m gpu tests/gpu."""

import pytest
import torch
from helpers import layout_for, make_batch, write_batch
from vllm_kvpress.triton_kernels.decode_attention import split_buffers

from vllm_kvpress.decode import decode_attention, decode_kernel
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention

pytestmark = pytest.mark.gpu

# (method, settings, heads, kv_heads, head_size)
CASES = [
    ("kivi", {"bits": 4}, 32, 8, 128),  # Llama-3.1-8B, two V groups
    ("gear", {"bits": 4, "outliers": 16}, 32, 8, 128),  # rank 1, 16 outlier slots
    ("gear", {"bits": 2}, 9, 3, 64),  # SmolLM2-135M
    ("kivi", {"bits": 2, "group_size": "head"}, 14, 2, 64),  # Qwen2.5-0.5B
    ("gear", {"bits": 4, "block_size": 128, "outliers": 32}, 8, 8, 128),
    ("kivi", {"bits": 4, "block_size": 32}, 64, 8, 128),
    ("gear", {"bits": 2, "outliers": 0}, 16, 4, 128),
    ("gear", {"bits": 4, "outliers": 64}, 32, 8, 128),  # four slot tiles
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


def test_sharp_attention_with_outliers():
    """Scores spread over a wide range: the running max grows block after block, and the outlier
    tiles (added to the accumulator after its rescaling) must follow it."""
    _, out, expected = _decode("gear", {"bits": 4}, 32, 8, 128, torch.bfloat16, 2, q_scale=3.0)
    torch.testing.assert_close(out["cuda"].float(), expected, **TOL)


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", [CASES[1], CASES[3], CASES[5]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_decode_reads_the_exact_tail(method, settings, heads, kv_heads, head_size, dtype):
    """tail_keys exact: partial blocks' keys from the tail (triton_kernels/exact_tail.py), under
    request-state slots that are not the batch rows, as the reference and the Triton kernel read them."""
    from helpers import write_batch_exact_tail

    layout, iters = layout_for(method, head_size, tail_keys="exact", **settings)
    slots = [4, 0, 2, 6, 1]
    batch = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), kv_heads, head_size, layout.block_size, device="cuda",
                       dtype=dtype)
    cache, tail, k_new, v_new = write_batch_exact_tail(batch, layout, iters, slots)
    q = torch.randn(len(CONTEXT_LENS), heads, head_size, device="cuda").to(dtype)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device="cuda")
    row_slots = torch.tensor(slots, dtype=torch.int32, device="cuda")
    assert decode_kernel(layout, heads // kv_heads, dtype, torch.device("cuda"))[0] == "cuda"  # what "auto" runs
    expected = paged_attention(q, k_new, v_new, list(range(len(CONTEXT_LENS) + 1)), batch.seq_lens,
                               lambda i, s: page_codec.read_sequence(cache, batch.block_table[i], s, layout,
                                                                     tail[slots[i]]), head_size ** -0.5)
    for name in ("cuda", "triton"):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, cache, batch.block_table, seq_lens, out, layout, scale=head_size ** -0.5, num_splits=3,
                         split_buffers=split_buffers(len(CONTEXT_LENS) * 3, heads, head_size, "cuda"), kernel=name,
                         tail=(tail, row_slots))
        torch.testing.assert_close(out.float(), expected, **TOL)


@pytest.mark.parametrize("num_splits", [1, 7])
def test_cuda_decode_is_exact_across_splits(num_splits):
    """More splits than a sequence has blocks leaves CTAs and warps empty: they must merge as nothing."""
    _, out, expected = _decode("gear", {"bits": 4}, 32, 8, 128, torch.bfloat16, num_splits)
    torch.testing.assert_close(out["cuda"].float(), expected, **TOL)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_cuda_decode_reads_head_wise_packed_pages(num_splits):
    """RazorAttention's packed pages (eviction/headwise.py) through the CUDA kernel, next to a plain
    row: each KV head attends to its own tokens, like the reference reader and the Triton kernel."""
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages

    from vllm_kvpress.eviction.headwise import compact_prompt_headwise, middle_blocks

    layout, iters = layout_for("kivi", 128, bits=4)
    bs, heads, kv_heads, retrieval = layout.block_size, 32, 8, [2, 5]
    index = [retrieval.index(h) if h in retrieval else -1 for h in range(kv_heads)]
    prompt, kept, plain = 40 * bs + 17, 5, 900
    batch = make_batch([0, 0], [prompt + 1, plain + 1], kv_heads, 128, bs, device="cuda")
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device="cuda")
    row0, row1 = batch.block_table[0], batch.block_table[1]

    def write(i, a, b):
        write_kv_pages(batch.full_k[i][a:b], batch.full_v[i][a:b], cache, batch.slots(i, a, b, bs).cuda(), layout,
                       power_iters=iters)

    write(0, 0, prompt)
    view_kept = compact_prompt_headwise(layout, cache, row0, prompt, index, kept, sink=4)
    write(0, prompt, prompt + 1)
    write(1, 0, plain + 1)
    chunks, middle = prompt // bs - kept, middle_blocks(prompt // bs, kept, len(retrieval), kv_heads)
    view0 = torch.cat([row0[:view_kept], row0[prompt // bs:]])
    table = torch.stack([torch.nn.functional.pad(view0, (0, batch.block_table.shape[1] - view0.shape[0])), row1]).int()
    seq_lens = torch.tensor([view_kept * bs + prompt % bs + 1, plain + 1], dtype=torch.int32, device="cuda")
    headwise = (torch.tensor([[kept, chunks, middle], [0, 0, 0]], dtype=torch.int32, device="cuda"),
                torch.tensor(index, dtype=torch.int32, device="cuda"), len(retrieval))
    q = torch.randn(2, heads, 128, device="cuda").bfloat16()
    out = {}
    for name in ("cuda", "triton"):
        out[name] = torch.full_like(q, float("nan"))
        decode_attention(q, cache, table, seq_lens, out[name], layout, scale=128 ** -0.5, num_splits=num_splits,
                         split_buffers=split_buffers(2 * num_splits, heads, 128, "cuda"), kernel=name,
                         headwise=headwise)
    for s, (kept_s, chunks_s, middle_s) in enumerate(headwise[0].tolist()):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            k, v = page_codec.read_head_sequence(cache, table[s], kv, index[kv], int(seq_lens[s]), layout,
                                                 kept=kept_s, chunks=chunks_s, middle=middle_s,
                                                 retrieval_heads=len(retrieval))
            expected = torch.softmax(k @ q[s, h].float() * 128 ** -0.5, 0) @ v
            torch.testing.assert_close(out["cuda"][s, h].float(), expected, **TOL)
    torch.testing.assert_close(out["cuda"].float(), out["triton"].float(), **TOL)
