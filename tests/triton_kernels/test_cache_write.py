"""triton_kernels/cache_write.py against reference/page_codec.py (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from vllm_kvpress.reference import page_codec
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from helpers import layout_for, make_batch

# (method, settings, head_size, kv_heads): every bit width, both head sizes, grouped and whole-head V
CASES = [
    ("kivi", {"bits": 4}, 64, 3),
    ("kivi", {"bits": 2, "group_size": 32}, 128, 2),
    ("kivi", {"bits": 8, "block_size": 16}, 128, 1),
    ("gear", {"bits": 4}, 64, 1),
    ("gear", {"bits": 2, "rank": 2, "outliers": 16}, 128, 2),
]
# chunk boundaries of one 150-token sequence: a prefill chunk ending mid-block, a chunk that
# completes a staged block, single decode tokens, and one that fills a block exactly
CHUNKS = [(0, 100), (100, 127), (127, 128), (128, 130), (130, 150)]


@pytest.mark.parametrize("method,settings,head_size,kv_heads", CASES)
def test_write_matches_reference(method, settings, head_size, kv_heads, device):
    layout, iters = layout_for(method, head_size, **settings)
    bs = layout.block_size
    batch = make_batch([0], [150], kv_heads, head_size, bs, device=device)
    ref = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device=device)
    out = ref.clone()
    k, v = batch.full_k[0], batch.full_v[0]
    for a, b in CHUNKS:
        slots = batch.slots(0, a, b, bs).to(device)
        page_codec.write_tokens(ref, k[a:b], v[a:b], slots, layout, iters)
        write_kv_pages(k[a:b], v[a:b], out, slots, layout, power_iters=iters)
    if layout.rank == 0 and layout.num_outliers == 0:
        # plain quantization is deterministic elementwise math: the bytes must be identical
        assert torch.equal(out, ref)
    k_ref, v_ref = page_codec.read_sequence(ref, batch.block_table[0], 150, layout)
    k_out, v_out = page_codec.read_sequence(out, batch.block_table[0], 150, layout)
    # GEAR's power iteration sums in a different order: factors agree to fp16 rounding
    tol = dict(atol=2e-3 * k.float().abs().max().item(), rtol=0)
    torch.testing.assert_close(k_out, k_ref, **tol)
    torch.testing.assert_close(v_out, v_ref, **tol)


def test_padding_slots_are_skipped(device):
    layout, iters = layout_for("kivi", 64)
    batch = make_batch([0], [64], 2, 64, layout.block_size, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, 2, layout.bytes_per_head, dtype=torch.uint8, device=device)
    slots = batch.slots(0, 0, 64, 64).to(device)
    padded = torch.cat([slots, torch.full((5,), -1, dtype=torch.int32, device=device)])
    k = torch.cat([batch.full_k[0], torch.randn(5, 2, 64, device=device).bfloat16()])
    v = torch.cat([batch.full_v[0], torch.randn(5, 2, 64, device=device).bfloat16()])
    write_kv_pages(k, v, cache, padded, layout, power_iters=iters)
    untouched = torch.ones(cache.shape[0], dtype=torch.bool)
    untouched[batch.block_table[0, 0]] = False
    assert cache[untouched.to(device)].eq(0).all()


def test_wrapper_rejects_bad_inputs(device):
    layout, _ = layout_for("kivi", 64)
    cache = torch.zeros(4, 2, layout.bytes_per_head, dtype=torch.uint8, device=device)
    k = torch.randn(3, 2, 64, device=device)  # fp32
    with pytest.raises(ValueError, match="Invalid dtype of key: expected torch.float16 or torch.bfloat16"):
        write_kv_pages(k, k, cache, torch.zeros(3, dtype=torch.int32, device=device), layout)
    with pytest.raises(ValueError, match="Invalid shape of cache"):
        write_kv_pages(k.bfloat16(), k.bfloat16(), cache[:, :, :-1], torch.zeros(3, dtype=torch.int32, device=device), layout)
