"""`tail_keys: exact`: partial blocks keep their keys in a tail beside the pages (triton_kernels/
exact_tail.py). The write, decode, prefill and page-read kernels against reference/page_codec.py
and reference attention (TRITON_INTERPRET=1 on CPU), and why the tail exists: keys with a few
huge channels, which per-token staging rounds away."""

import pytest
import torch
from helpers import layout_for, make_batch, write_batch_exact_tail
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from vllm_kvpress.triton_kernels.decode_attention import split_buffers
from vllm_kvpress.triton_kernels.exact_tail import exact_tail_buffer
from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention
from vllm_kvpress.triton_kernels.read_pages import read_pages_into

from vllm_kvpress.decode import decode_attention
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention

# (method, settings, heads, kv_heads, head_size)
CASES = [
    ("kivi", {"bits": 4}, 14, 2, 64),
    ("gear", {"bits": 4}, 9, 3, 64),
    ("gear", {"bits": 2}, 8, 2, 128),
]
# as test_attention_kernels: two decodes (a partial block, one ending on a block), a prefill chunk
# continuing a context that ends mid-block, one from scratch
CONTEXT_LENS, QUERY_LENS = [130, 63, 70, 0], [1, 1, 70, 90]
REQUEST_SLOTS = [5, 0, 3, 1]  # request-state slots are not batch rows
TOL = {"atol": 2e-2, "rtol": 1.6e-2}


def _exact(method, settings, head_size):
    return layout_for(method, head_size, tail_keys="exact", **settings)


def _read(cache, tail, batch, i, seq_len, layout):
    return page_codec.read_sequence(cache.cpu(), batch.block_table[i].cpu(), seq_len, layout,
                                    tail[REQUEST_SLOTS[i]].cpu())


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", CASES)
def test_write_matches_reference(method, settings, heads, kv_heads, head_size, device):
    """One sequence written in chunks that end mid-block, complete a block and stage into the next in
    one write (the encode must read the tail before the new partial block overwrites it), and
    decode tokens; the pages and the tail equal the reference's."""
    layout, iters = _exact(method, settings, head_size)
    bs = layout.block_size
    batch = make_batch([0], [150], kv_heads, head_size, bs, device=device)
    k, v = batch.full_k[0], batch.full_v[0]
    ref = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8)
    out = ref.clone().to(device)
    ref_tail, out_tail = exact_tail_buffer(3, kv_heads, layout, k.dtype, "cpu"), exact_tail_buffer(3, kv_heads, layout,
                                                                                                  k.dtype, device)
    for a, b in [(0, 40), (40, 100), (100, 101), (101, 130), (130, 150)]:
        slots = batch.slots(0, a, b, bs)
        token_slots = torch.full((b - a,), 2, dtype=torch.int32)
        page_codec.write_tokens(ref, k[a:b].cpu(), v[a:b].cpu(), slots, layout, iters, (ref_tail, token_slots))
        write_kv_pages(k[a:b], v[a:b], out, slots.to(device), layout, power_iters=iters,
                       tail=(out_tail, token_slots.to(device)))
    assert torch.equal(out_tail.cpu()[2, :, : 150 % bs], k[128:150].cpu().transpose(0, 1))
    assert torch.equal(out_tail.cpu(), ref_tail)
    k_ref, v_ref = page_codec.read_sequence(ref, batch.block_table[0].cpu(), 150, layout, ref_tail[2])
    k_out, v_out = page_codec.read_sequence(out.cpu(), batch.block_table[0].cpu(), 150, layout, out_tail[2].cpu())
    if layout.rank == 0 and layout.num_outliers == 0:
        assert torch.equal(out.cpu(), ref)
    tol = {"atol": 2e-3 * k.float().abs().max().item(), "rtol": 0}
    torch.testing.assert_close(k_out, k_ref, **tol)
    torch.testing.assert_close(v_out, v_ref, **tol)
    # a partial block's keys are the exact ones, and complete blocks were encoded from exact keys
    torch.testing.assert_close(k_out[128:], k[128:].float().cpu(), atol=0, rtol=0)


def _setup(method, settings, heads, kv_heads, head_size, device):
    """The pages and tail of CONTEXT_LENS + QUERY_LENS written by the write kernel, this step's
    queries, and reference attention over what the reference codec reads back."""
    layout, iters = _exact(method, settings, head_size)
    batch = make_batch(CONTEXT_LENS, QUERY_LENS, kv_heads, head_size, layout.block_size, device=device)
    cache, tail, k_new, v_new = write_batch_exact_tail(batch, layout, iters, REQUEST_SLOTS, spare_blocks=2)
    q = torch.randn(sum(QUERY_LENS), heads, head_size, device=device).bfloat16()
    expected = paged_attention(q.cpu(), k_new.cpu(), v_new.cpu(), batch.query_start_loc().tolist(), batch.seq_lens,
                               lambda i, s: _read(cache, tail, batch, i, s, layout), head_size ** -0.5)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=device)
    slots = torch.tensor(REQUEST_SLOTS, dtype=torch.int32, device=device)
    return layout, batch, cache, (tail, slots), q, k_new, v_new, seq_lens, expected


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(method, settings, heads, kv_heads, head_size, num_splits, device):
    layout, batch, cache, tail, q, _, _, seq_lens, expected = _setup(method, settings, heads, kv_heads, head_size,
                                                                     device)
    out = torch.full((2, heads, head_size), float("nan"), device=device).bfloat16()
    decode_attention(q[:2], cache, batch.block_table, seq_lens, out, layout, scale=head_size ** -0.5,
                     num_splits=num_splits, split_buffers=split_buffers(2 * num_splits, heads, head_size, device),
                     tail=tail)
    torch.testing.assert_close(out.float().cpu(), expected[:2], **TOL)


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", CASES[:2])
def test_prefill_and_page_read_match_reference(method, settings, heads, kv_heads, head_size, device):
    """The Triton prefill kernel, and the page read behind FlashAttention's prefill, take a context
    that ends mid-block from the tail."""
    layout, batch, cache, tail, q, k_new, v_new, seq_lens, expected = _setup(method, settings, heads, kv_heads,
                                                                             head_size, device)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_new, v_new, out, cache, batch.block_table, batch.query_start_loc().to(device), seq_lens,
                      layout, scale=head_size ** -0.5, first_seq=2, num_seqs=2, max_query_len=max(QUERY_LENS),
                      tail=tail)
    torch.testing.assert_close(out[2:].float().cpu(), expected[2:], **TOL)

    # the page read: row 2's 70 stored context tokens, whose last block is partial after the context
    # write (the step's own tokens complete it, but the read sees the context's stored length)
    context = torch.tensor([CONTEXT_LENS[2]], dtype=torch.int32, device=device)
    k_out = torch.full((CONTEXT_LENS[2], kv_heads, head_size), float("nan"), device=device).bfloat16()
    v_out = torch.full_like(k_out, float("nan"))
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    read_pages_into(cache, batch.block_table, context, seq_lens, zero, k_out, v_out, layout, first_row=2,
                    max_blocks=2, tail=tail)
    k_ref, v_ref = _read(cache, tail[0], batch, 2, batch.seq_lens[2], layout)
    torch.testing.assert_close(k_out.float().cpu(), k_ref[: CONTEXT_LENS[2]], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(v_out.float().cpu(), v_ref[: CONTEXT_LENS[2]], atol=2e-2, rtol=1e-2)


def test_huge_key_channels_survive_in_the_tail_and_not_in_staging(device):
    """Qwen2.5-like keys: two channels near 200, the rest near 1. Staged per token, the scale spans
    the huge channels and the others round to nothing; the exact tail keeps them."""
    kv_heads, head_size = 1, 64
    k = torch.randn(40, kv_heads, head_size)
    k[:, :, [0, 32]] = 200.0 + torch.randn(40, kv_heads, 2)
    k = k.bfloat16().to(device)
    v = torch.randn(40, kv_heads, head_size).bfloat16().to(device)
    slots = torch.arange(40, dtype=torch.int32, device=device)  # block 0, left partial
    normal = [c for c in range(head_size) if c not in (0, 32)]
    errors = {}
    for tail_keys in ("staged", "exact"):
        layout, iters = layout_for("kivi", head_size, bits=4, tail_keys=tail_keys)
        cache = torch.zeros(1, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device=device)
        tail = None
        if tail_keys == "exact":
            tail = (exact_tail_buffer(1, kv_heads, layout, k.dtype, device), torch.zeros(40, dtype=torch.int32,
                                                                                       device=device))
        write_kv_pages(k, v, cache, slots, layout, power_iters=iters, tail=tail)
        stored, _ = page_codec.read_sequence(cache.cpu(), torch.zeros(1), 40, layout,
                                             None if tail is None else tail[0][0].cpu())
        errors[tail_keys] = (stored[:, :, normal] - k[:, :, normal].float().cpu()).abs().mean().item()
    assert errors["exact"] == 0.0
    assert errors["staged"] > 0.5  # the normal channels' keys (|k| ~ 0.8) are mostly gone


def test_a_layout_and_its_tail_must_agree(device):
    layout, iters = layout_for("kivi", 64, tail_keys="exact")
    cache = torch.zeros(2, 1, layout.bytes_per_head, dtype=torch.uint8, device=device)
    k = torch.randn(3, 1, 64, device=device).bfloat16()
    slots = torch.arange(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="exact_tail_keys=True needs an exact tail buffer"):
        write_kv_pages(k, k, cache, slots, layout, power_iters=iters)
    staged, _ = layout_for("kivi", 64)
    tail = (exact_tail_buffer(1, 1, layout, k.dtype, device), torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="exact_tail_keys=False takes no exact tail buffer"):
        write_kv_pages(k, k, cache, slots, staged, power_iters=iters, tail=tail)
    with pytest.raises(ValueError, match="tail slots"):
        write_kv_pages(k, k, cache, slots, layout, power_iters=iters, tail=(tail[0], tail[1].long()))


def test_auto_decode_runs_the_cuda_kernel_for_exact_tails(monkeypatch):
    """The automatic choice, which the metadata builder logs and builds for, takes the CUDA kernel
    for exact tails as for staged ones (its GPU parity test: test_cuda_decode_reads_the_exact_tail)."""
    from vllm_kvpress import cuda_decode
    from vllm_kvpress import decode as decode_module

    layout, _ = layout_for("gear", 128, tail_keys="exact")
    assert cuda_decode.unsupported_reason(layout, 4, torch.bfloat16) is None
    monkeypatch.setattr(decode_module, "INTERPRETER", False)
    monkeypatch.setattr(cuda_decode, "device_unsupported_reason", lambda device: None)
    decode_module.decode_kernel.cache_clear()
    try:
        kernel, why = decode_module.decode_kernel(layout, 4, torch.bfloat16, torch.device("cuda"))
    finally:
        decode_module.decode_kernel.cache_clear()
    assert kernel == "cuda", why
