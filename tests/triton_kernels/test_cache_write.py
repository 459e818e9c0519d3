"""triton_kernels/cache_write.py against reference/page_codec.py (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch
from helpers import layout_for, make_batch
from vllm_kvpress.triton_kernels.cache_write import completing_tokens, max_completions, write_kv_pages

from vllm_kvpress.reference import page_codec

# (method, settings, head_size, kv_heads): every bit width, both head sizes, grouped and whole-head V
CASES = [
    ("kivi", {"bits": 4}, 64, 3),
    ("kivi", {"bits": 2, "group_size": 32}, 128, 2),
    ("kivi", {"bits": 8, "block_size": 16}, 128, 1),
    ("gear", {"bits": 4, "outliers": 16}, 64, 1),
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
        write_kv_pages(k.bfloat16(), k.bfloat16(), cache[:, :, :-1], torch.zeros(3, dtype=torch.int32, device=device),
                       layout)


@pytest.mark.parametrize("settings,head_size", [({"bits": 4}, 64), ({"bits": 2, "outliers": 32}, 128),
                                                 ({"bits": 4, "outliers": 64, "block_size": 32}, 64)])
@pytest.mark.parametrize("coarse", [False, True], ids=["distinct", "tied"])
def test_outlier_slots_are_the_references(settings, head_size, coarse, device):
    """The threshold search lands on the exact (n+1)-th largest z-score: the same entries, in the
    same slots, as the reference's top-k, also where scores tie at the threshold (coarse values)."""
    layout, iters = layout_for("gear", head_size, **settings)
    bs = layout.block_size
    batch = make_batch([0], [4 * bs], 2, head_size, bs, device=device)
    if coarse:  # mostly -1, 0, 1: equal z-scores straddle the threshold, so fewer than n are taken
        batch.full_k[0] = (batch.full_k[0] * 0.5).round()
        batch.full_v[0] = (batch.full_v[0] * 0.5).round()
    ref = torch.zeros(batch.block_table.max() + 1, 2, layout.bytes_per_head, dtype=torch.uint8, device=device)
    out = ref.clone()
    slots = batch.slots(0, 0, 4 * bs, bs).to(device)
    page_codec.write_tokens(ref, batch.full_k[0], batch.full_v[0], slots, layout, iters)
    write_kv_pages(batch.full_k[0], batch.full_v[0], out, slots, layout, power_iters=iters)
    used = batch.block_table[0].long()
    for region in ("k_sparse", "v_sparse"):
        start = layout.offset(region)
        index_bytes = slice(start, start + 2 * layout.num_outliers)
        assert torch.equal(out[used][:, :, index_bytes], ref[used][:, :, index_bytes])


def test_completing_tokens_lists_the_rows_at_a_blocks_last_offset_in_order():
    bs = 4
    # two sequences' chunks and a padding row: slots 6, 7 | 9, 10, 11, 12, 13, 14, 15 | -1
    slots = torch.tensor([6, 7, 9, 10, 11, 12, 13, 14, 15, -1], dtype=torch.int32)
    out = completing_tokens(slots, bs, max_completions(slots.shape[0], 2, bs))
    assert out.dtype == torch.int32
    assert out.tolist() == [1, 4, 8, -1]  # slots 7, 11, 15 end blocks 1, 2, 3; the rest is -1
    # a persistent buffer is filled in place, stale entries of a longer earlier step overwritten
    buffer = torch.full((16,), 5, dtype=torch.int32)
    view = completing_tokens(slots[:2], bs, 2, out=buffer)
    assert view.data_ptr() == buffer.data_ptr() and view.tolist() == [1, -1]
    assert buffer.tolist() == [1] + [-1] * 15


@pytest.mark.parametrize("seed", range(5))
def test_the_completion_bound_holds_for_any_batch_of_chunks(seed):
    gen = torch.Generator().manual_seed(seed)
    bs = 16
    lengths = torch.randint(1, 80, (7,), generator=gen).tolist()
    starts = torch.randint(0, 200, (7,), generator=gen).tolist()
    # each sequence's chunk covers consecutive positions; blocks are far apart per sequence
    slots = torch.cat([1000 * i + torch.arange(a, a + n) for i, (a, n) in enumerate(zip(starts, lengths))])
    completed = int(((slots % bs) == bs - 1).sum())
    bound = max_completions(slots.shape[0], len(lengths), bs)
    assert completed <= bound <= slots.shape[0]
    out = completing_tokens(slots.int(), bs, bound)
    assert int((out >= 0).sum()) == completed


def test_a_batch_of_sequences_writes_like_the_reference_with_the_tight_bound(device):
    layout, iters = layout_for("gear", 64, bits=4)
    bs = layout.block_size
    batch = make_batch([10, 60, 0], [100, 4, 64], 2, 64, bs, device=device)
    ref = torch.zeros(batch.block_table.max() + 1, 2, layout.bytes_per_head, dtype=torch.uint8, device=device)
    out = ref.clone()
    def write_reference(k, v, slots):
        page_codec.write_tokens(ref, k, v, slots, layout, iters)

    batch.write_context(write_reference, bs)
    batch.write_new(write_reference, bs)
    batch.write_context(lambda k, v, slots: write_kv_pages(k, v, out, slots, layout, power_iters=iters), bs)
    # this step's tokens of all three sequences in one write, its grid bounded by the 3 sequences
    batch.write_new(lambda k, v, slots: write_kv_pages(k, v, out, slots, layout, power_iters=iters, num_seqs=3), bs)
    for i, n in enumerate(batch.seq_lens):
        k_ref, v_ref = page_codec.read_sequence(ref, batch.block_table[i], n, layout)
        k_out, v_out = page_codec.read_sequence(out, batch.block_table[i], n, layout)
        tol = dict(atol=2e-3 * max(k_ref.abs().max().item(), v_ref.abs().max().item()), rtol=0)
        torch.testing.assert_close(k_out, k_ref, **tol)
        torch.testing.assert_close(v_out, v_ref, **tol)
