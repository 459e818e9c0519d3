"""Mixed-precision pages (MiKV) through the worker's kernels (TRITON_INTERPRET=1 on CPU): the
compaction that splits a prompt into important high-precision blocks and low-precision units
(eviction/mixed.py), and decode over such rows next to plain ones, against the reference codec
(reference/page_codec.py) reading the same bytes."""

import pytest
import torch
from helpers import make_batch
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from vllm_kvpress.triton_kernels.decode_attention import split_buffers

from vllm_kvpress.config import load_method_config
from vllm_kvpress.decode import decode_attention
from vllm_kvpress.eviction.compaction import PromptCompaction
from vllm_kvpress.eviction.mixed import compact_prompt_mixed
from vllm_kvpress.eviction.policy import every_head_blocks
from vllm_kvpress.reference import page_codec

TOL = dict(atol=2e-2, rtol=1.6e-2)
"""bf16 outputs of fp32 math, as the other attention kernel tests."""
BS, HEAD_SIZE = 16, 64


def _method(kv_heads, bs=BS, **settings):
    method = load_method_config({"method": "mikv", "block_size": bs, "budget": 3 * bs, "window": bs, "sink": 4,
                                 "observation_window": 8, **settings})
    return method, method.page_layout(HEAD_SIZE), method.middle_packing(kv_heads, HEAD_SIZE)


def _mixed_batch(method, layout, packing, heads, kv_heads, prompt, plain, device):
    """Row 0: a prompt split after its last chunk, then one decode token; row 1: a plain sequence
    of `plain` tokens and its decode token. Returns the cache, the view table, view seq lens and
    the (K, n, L) rows."""
    bs = layout.block_size
    batch = make_batch([0, 0], [prompt + 1, plain + 1], kv_heads, HEAD_SIZE, bs, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    row0, row1 = batch.block_table[0], batch.block_table[1]

    def write(i, a, b):
        write_kv_pages(batch.full_k[i][a:b], batch.full_v[i][a:b], cache, batch.slots(i, a, b, bs).to(device),
                       layout, power_iters=method.pages.power_iters)

    write(0, 0, prompt)
    important = every_head_blocks(prompt, method.budget, bs)
    chunks = prompt // bs - important
    kept = method.kept_prompt_blocks(prompt, kv_heads, HEAD_SIZE)
    query = torch.randn(prompt, heads, HEAD_SIZE, device=device).bfloat16()  # the prompt's last chunk: all of it
    compact_prompt_mixed(method, layout, cache, row0, query, PromptCompaction(0, prompt, 0, 0, kept), 0.125,
                         power_iters=method.pages.power_iters)
    write(0, prompt, prompt + 1)  # the first decode token, in the tail block, after the split
    write(1, 0, plain + 1)
    width = batch.block_table.shape[1]
    view0 = torch.cat([row0[:kept], row0[prompt // bs:]])
    table = torch.stack([torch.nn.functional.pad(view0, (0, width - view0.shape[0])), row1]).int()
    seq_lens = torch.tensor([kept * bs + prompt % bs + 1, plain + 1], dtype=torch.int32, device=device)
    rows = torch.tensor([[important, chunks, kept - important], [0, 0, 0]], dtype=torch.int32, device=device)
    return cache, table, seq_lens, rows, batch


def _reference_sequence(cache, table_row, seq_len, rows, layout, low_layout, packing):
    """Dequantized K, V of one view row: important blocks, low units, then the tail (CPU)."""
    important, chunks, low_blocks = rows
    cache, table_row, bs = cache.cpu(), table_row.cpu(), layout.block_size
    if not chunks:  # a row that is not split
        return page_codec.read_sequence(cache, table_row, seq_len, layout)
    high_k, high_v = page_codec.read_sequence(cache, table_row[:important], important * bs, layout)
    low_k, low_v = page_codec.read_low_chunks(cache, table_row[important : important + low_blocks], chunks,
                                              low_layout, packing)
    kept = important + low_blocks
    tail_k, tail_v = page_codec.read_sequence(cache, table_row[kept:], seq_len - kept * bs, layout)
    return torch.cat([high_k, low_k, tail_k]), torch.cat([high_v, low_v, tail_v])


@pytest.mark.parametrize(("heads", "kv_heads", "pages"), [(6, 2, "kivi"), (9, 3, "gear")])
def test_compaction_writes_what_the_reference_split_writes(heads, kv_heads, pages, device):
    """The worker's split (Triton write kernel, scratch then unit copy) stores the important
    tokens at 8 bits and the rest at 2 bits where the geometry puts them: each token's K is read
    back near its original from the one precision it was given."""
    method, layout, packing = _method(kv_heads, pages=pages)
    low_layout = method.low_page_layout(HEAD_SIZE)
    prompt = 10 * BS + 7
    cache, table, seq_lens, rows, batch = _mixed_batch(method, layout, packing, heads, kv_heads, prompt, 40, device)
    important, chunks, low_blocks = rows[0].tolist()
    assert low_blocks == packing.middle_blocks(prompt // BS, important) and important + low_blocks < prompt // BS
    k, _ = _reference_sequence(cache, table[0], int(seq_lens[0]), rows[0].tolist(), layout, low_layout, packing)
    exact = batch.full_k[0][: prompt // BS * BS].float().cpu()
    # every stored full-block token is one original token: the nearest by far (8 bits) or near (2 bits)
    stored = k[: (important + chunks) * BS]
    for h in range(kv_heads):
        origin = torch.cdist(stored[:, h][None], exact[:, h][None])[0].argmin(-1)
        assert sorted(origin.tolist()) == list(range(prompt // BS * BS)), f"head {h}: a token lost or doubled"
        high_error = (stored[: important * BS, h] - exact[origin[: important * BS], h]).abs().mean()
        low_error = (stored[important * BS :, h] - exact[origin[important * BS :], h]).abs().mean()
        assert high_error < 0.02 and 4 * high_error < low_error < 0.6, (high_error, low_error)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("heads", "kv_heads", "pages", "bs"),
                         [(6, 2, "kivi", 16), (9, 3, "gear", 16), (8, 1, "kivi", 16), (14, 2, "kivi", 64)])
def test_decode_reads_mixed_precision_rows_next_to_plain_ones(heads, kv_heads, pages, bs, num_splits, device):
    method, layout, packing = _method(kv_heads, bs, pages=pages)
    low_layout = method.low_page_layout(HEAD_SIZE)
    cache, table, seq_lens, rows, _ = _mixed_batch(method, layout, packing, heads, kv_heads, 12 * bs + 3, 40,
                                                   device)
    q = torch.randn(2, heads, HEAD_SIZE, device=device).bfloat16()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, table, seq_lens, out, layout, scale=0.125, num_splits=num_splits,
                     split_buffers=split_buffers(2 * 2 * num_splits, heads, HEAD_SIZE, device),
                     mixed=(rows, low_layout, packing.units_per_block))
    group = heads // kv_heads
    for s in range(2):
        k, v = _reference_sequence(cache, table[s], int(seq_lens[s]), rows[s].tolist(), layout, low_layout, packing)
        assert k.shape[0] == int(seq_lens[s]) - int(rows[s, 2]) * bs + int(rows[s, 1]) * bs
        for h in range(heads):
            weights = torch.softmax(k[:, h // group] @ q[s, h].float().cpu() * 0.125, 0)
            torch.testing.assert_close(out[s, h].float().cpu(), weights @ v[:, h // group], **TOL)


def test_mixed_decode_needs_room_for_both_passes(device):
    method, layout, packing = _method(2)
    q = torch.randn(2, 6, HEAD_SIZE, device=device).bfloat16()
    with pytest.raises(ValueError, match="2 splits"):
        decode_attention(q, torch.zeros(4, 2, layout.bytes_per_head, dtype=torch.uint8, device=device),
                         torch.zeros(2, 4, dtype=torch.int32, device=device),
                         torch.ones(2, dtype=torch.int32, device=device), torch.empty_like(q), layout, scale=0.125,
                         num_splits=1, split_buffers=split_buffers(2, 6, HEAD_SIZE, device),
                         mixed=(torch.zeros(2, 3, dtype=torch.int32, device=device),
                                method.low_page_layout(HEAD_SIZE), packing.units_per_block))


@pytest.mark.parametrize(("heads", "kv_heads", "pages"), [(6, 2, "kivi"), (9, 3, "gear")])
def test_read_pages_expands_mixed_rows_for_the_prefill_workspace(heads, kv_heads, pages, device):
    """FlashAttention's prefill reads a chunk's context through `read_pages_into`: a split row's
    context lands as important, low-precision, then tail tokens, a plain row's as stored, each
    at its varlen offset."""
    from vllm_kvpress.triton_kernels.read_pages import read_pages_into

    method, layout, packing = _method(kv_heads, pages=pages)
    low_layout = method.low_page_layout(HEAD_SIZE)
    cache, table, seq_lens, rows, _ = _mixed_batch(method, layout, packing, heads, kv_heads, 11 * BS + 9, 50,
                                                   device)
    expected = [_reference_sequence(cache, table[s], int(seq_lens[s]), rows[s].tolist(), layout, low_layout, packing)
                for s in range(2)]
    counts = [e[0].shape[0] for e in expected]
    starts = [3, 3 + counts[0] + 5]  # gaps: the fresh chunk's rows in the workspace
    k_out = torch.full((starts[1] + counts[1], kv_heads, HEAD_SIZE), float("nan"), device=device)
    v_out = torch.full_like(k_out, float("nan"))
    as_int = {"dtype": torch.int32, "device": device}
    read_pages_into(cache, table, torch.tensor(counts, **as_int), seq_lens, torch.tensor(starts, **as_int), k_out,
                    v_out, layout, first_row=0, max_blocks=-(-max(counts) // BS),
                    mixed=(rows, low_layout, packing.units_per_block))
    for s in range(2):
        got = slice(starts[s], starts[s] + counts[s])
        torch.testing.assert_close(k_out[got].cpu(), expected[s][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(v_out[got].cpu(), expected[s][1], rtol=0, atol=1e-5)
    assert k_out[: starts[0]].isnan().all() and k_out[starts[0] + counts[0] : starts[1]].isnan().all()


@pytest.mark.parametrize("bs", [16, 64])
def test_triton_decode_reads_the_low_precision_chunks_as_plain_pages(bs, device):
    """The units of a split row, gathered into a cache of the low layout, read by the Triton decode
    kernel without the mixed passes: separates the low layout's own read from the passes'."""
    heads, kv_heads = 6, 2
    method, layout, packing = _method(kv_heads, bs)
    low_layout = method.low_page_layout(HEAD_SIZE)
    cache, table, seq_lens, rows, _ = _mixed_batch(method, layout, packing, heads, kv_heads, 12 * bs + 3, 40, device)
    important, chunks, low_blocks = rows[0].tolist()
    plain = packing.gather_units(cache, table[0][important : important + low_blocks], chunks).contiguous()
    block_table = torch.arange(chunks, dtype=torch.int32, device=device)[None]
    q = torch.randn(1, heads, HEAD_SIZE, device=device).bfloat16()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, plain, block_table, torch.tensor([chunks * bs], dtype=torch.int32, device=device), out,
                     low_layout, scale=0.125, num_splits=2, split_buffers=split_buffers(2, heads, HEAD_SIZE, device),
                     kernel="triton")
    k, v = page_codec.read_sequence(plain.cpu(), block_table[0].cpu(), chunks * bs, low_layout)
    group = heads // kv_heads
    for h in range(heads):
        weights = torch.softmax(k[:, h // group] @ q[0, h].float().cpu() * 0.125, 0)
        torch.testing.assert_close(out[0, h].float().cpu(), weights @ v[:, h // group], **TOL)
