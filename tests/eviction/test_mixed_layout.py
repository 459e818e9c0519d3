"""Mixed-precision pages (vllm_kvpress/mixed_layout.py, methods/mikv.py): the geometry of the
low-precision units, the reference codec that packs them, and the schedule the block manager and
the engines agree on.

- U units of the low layout fit in one block's bytes, and U + 1 do not;
- every (chunk, head) unit has its own place inside the low region, never across a block's end;
- packed units decode to exactly what a plain low-precision cache of the same tokens decodes to;
- the schedule keeps K important + L low blocks and frees the rest of the full prompt blocks.
"""

import numpy as np
import pytest
import torch

from vllm_kvpress.config import load_method_config
from vllm_kvpress.eviction.policy import compacts, freed_end, kept_prompt_blocks
from vllm_kvpress.mixed_layout import LowPrecisionPacking
from vllm_kvpress.reference import page_codec

CASES = [(64, 1), (64, 2), (64, 3), (128, 8)]
"""(head size, KV heads): SmolLM2 has 3 KV heads of 64, Qwen2.5-0.5B 2, Llama-3.1-8B 8 of 128."""


def _mikv(**settings):
    return load_method_config({"method": "mikv", **settings})


@pytest.mark.parametrize(("head_size", "kv_heads"), CASES)
@pytest.mark.parametrize(("high_bits", "low_bits"), [(8, 2), (8, 4), (4, 2)])
def test_units_fill_a_block_without_overflowing_it(head_size, kv_heads, high_bits, low_bits):
    method = _mikv(high_bits=high_bits, low_bits=low_bits)
    high, low = method.page_layout(head_size), method.low_page_layout(head_size)
    packing = LowPrecisionPacking.for_layouts(high, low, kv_heads)
    block_bytes = high.page_size_bytes(kv_heads)
    assert packing.unit_bytes == low.bytes_per_head < high.bytes_per_head
    units = packing.units_per_block
    assert units * low.bytes_per_head <= block_bytes < (units + 1) * low.bytes_per_head


@pytest.mark.parametrize(("head_size", "kv_heads"), CASES)
def test_every_unit_has_its_own_place_inside_the_low_region(head_size, kv_heads):
    method = _mikv()
    packing = method.middle_packing(kv_heads, head_size)
    block_bytes = method.page_layout(head_size).page_size_bytes(kv_heads)
    kept, chunks = 5, 23
    middle = packing.middle_blocks(kept + chunks, kept)
    places = set()
    for c in range(chunks):
        for h in range(kv_heads):
            block, offset = packing.unit_location(c, h, kept)
            assert kept <= block < kept + middle
            assert offset % packing.unit_bytes == 0 and offset + packing.unit_bytes <= block_bytes
            places.add((block, offset))
    assert len(places) == chunks * kv_heads
    # the last block is needed: without it the units would not fit
    assert (middle - 1) * packing.units_per_block < chunks * kv_heads <= middle * packing.units_per_block


def test_middle_blocks_on_arrays_match_ints():
    packing = LowPrecisionPacking(units_per_block=10, kv_heads=3, unit_bytes=2560)
    prompt_blocks, kept = np.array([31, 250, 4, 9]), np.array([5, 38, 4, 9])
    expected = [packing.middle_blocks(int(p), int(k)) for p, k in zip(prompt_blocks, kept, strict=True)]
    assert packing.middle_blocks(prompt_blocks, kept).tolist() == expected == [8, 64, 0, 0]


@pytest.mark.parametrize(("head_size", "kv_heads"), [(64, 3), (128, 2)])
@pytest.mark.parametrize("pages", ["kivi", "gear"])
def test_packed_units_decode_as_a_plain_low_precision_cache(head_size, kv_heads, pages):
    generator = torch.Generator().manual_seed(head_size * kv_heads)
    method = _mikv(pages=pages, block_size=16)
    high, low = method.page_layout(head_size), method.low_page_layout(head_size)
    packing = method.middle_packing(kv_heads, head_size)
    chunks, first = 7, 2  # first: blocks the case leaves untouched besides the region
    tokens = chunks * low.block_size
    key = torch.randn(tokens, kv_heads, head_size, generator=generator).bfloat16()
    value = torch.randn(tokens, kv_heads, head_size, generator=generator).bfloat16()

    cache = torch.randint(0, 256, (first + 6, kv_heads, high.bytes_per_head), generator=generator, dtype=torch.uint8)
    before = cache.clone()
    # the request's low region, in view order, on scattered physical blocks
    region = torch.randperm(cache.shape[0], generator=generator)[: packing.middle_blocks(chunks, 0)]
    used = page_codec.write_low_chunks(cache, region, key, value, low, packing, power_iters=2)
    assert used == region.numel()
    untouched = torch.ones(cache.shape[0], dtype=torch.bool)
    untouched[region] = False
    assert torch.equal(cache[untouched], before[untouched])

    plain = torch.zeros(chunks, kv_heads, low.bytes_per_head, dtype=torch.uint8)
    page_codec.write_tokens(plain, key, value, torch.arange(tokens), low, power_iters=2)
    rows = cache.reshape(cache.shape[0], -1)
    for c in range(chunks):
        for h in range(kv_heads):
            block, offset = packing.unit_location(c, h, 0)
            assert torch.equal(rows[region[block], offset : offset + packing.unit_bytes], plain[c, h])
    k_read, v_read = page_codec.read_low_chunks(cache, region, chunks, low, packing)
    k_plain, v_plain = page_codec.read_sequence(plain, torch.arange(chunks), tokens, low)
    assert torch.equal(k_read, k_plain) and torch.equal(v_read, v_plain)
    # 2-bit codes lose much, but stay the tokens they encode
    assert (k_read - key.float()).abs().mean() < 0.5 * key.float().abs().mean()


def test_low_chunks_must_be_whole_blocks():
    method = _mikv(block_size=16)
    low = method.low_page_layout(64)
    cache = torch.zeros(4, 2, method.page_layout(64).bytes_per_head, dtype=torch.uint8)
    with pytest.raises(ValueError, match="whole blocks"):
        page_codec.write_low_chunks(cache, torch.arange(4), torch.randn(20, 2, 64), torch.randn(20, 2, 64), low,
                                    method.middle_packing(2, 64), power_iters=1)


@pytest.mark.parametrize("prompt_len", [100, 2000, 4032, 16000])
def test_schedule_keeps_important_and_low_blocks_and_frees_the_rest(prompt_len):
    method = _mikv()
    head_size, kv_heads, bs = 64, 3, method.block_size
    packing = method.middle_packing(kv_heads, head_size)
    full = prompt_len // bs
    important = min(full, -(-int(np.ceil(prompt_len * method.budget)) // bs))
    low = -(-(full - important) * kv_heads // packing.units_per_block)
    kept = method.kept_prompt_blocks(prompt_len, kv_heads, head_size)
    assert kept == important + low == kept_prompt_blocks(prompt_len, method.budget, bs, packing)
    assert compacts(prompt_len, method.budget, bs, packing) == (kept < full)
    # the block manager frees [kept, full) once the prompt is computed, nothing before
    assert freed_end(prompt_len, prompt_len - 1, method.budget, bs, packing) == kept
    assert freed_end(prompt_len, prompt_len, method.budget, bs, packing) == max(full, kept)


def test_kept_blocks_need_the_model_geometry():
    with pytest.raises(ValueError, match="head size"):
        _mikv().kept_prompt_blocks(2000, 3)
