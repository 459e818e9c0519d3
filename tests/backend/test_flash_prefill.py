"""backend/flash_prefill.py: the varlen plan (host) and the keys FlashAttention reads (TRITON_INTERPRET=1
on CPU). FlashAttention itself runs on the GPU only: tests/gpu/test_kernel_parity.py."""

import numpy as np
import pytest
import torch
from helpers import layout_for, make_batch, write_batch

from vllm_kvpress.backend.flash_prefill import (
    flash_prefill_attention,
    plan_flash_prefill,
    prefill_keys_values,
)
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import causal_attention, paged_attention


def test_plan_places_each_chunk_after_its_context():
    # two decodes, then a prefill continuing 70 stored tokens and one from scratch
    plan = plan_flash_prefill(np.array([0, 1, 2, 72, 162]), np.array([131, 64, 140, 90]), 2, 2, 64, "cpu")
    assert (plan.first_token, plan.num_tokens, plan.total_keys) == (2, 160, 230)
    assert plan.cu_seqlens_q.tolist() == [0, 70, 160] and plan.cu_seqlens_k.tolist() == [0, 140, 230]
    assert plan.context_lens.tolist() == [70, 0] and plan.max_context_blocks == 2
    assert (plan.max_seqlen_q, plan.max_seqlen_k, plan.has_context) == (90, 140, True)
    assert plan.fresh_dest.tolist() == list(range(70, 140)) + list(range(140, 230))


def test_attention_needs_the_plan_to_name_a_flashattention_version():
    plan = plan_flash_prefill(np.array([0, 4]), np.array([4]), 0, 1, 64, "cpu")
    q = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="names no FlashAttention version"):
        flash_prefill_attention(q, q, q, q, None, None, None, None, plan, scale=0.125, first_seq=0)


def test_plan_without_context_reads_the_fresh_projections():
    plan = plan_flash_prefill(np.array([0, 1, 41, 141]), np.array([9, 40, 100]), 1, 2, 64, "cpu")
    assert not plan.has_context and plan.max_context_blocks == 0
    assert plan.cu_seqlens_k.tolist() == plan.cu_seqlens_q.tolist() == [0, 40, 140]
    key, value = torch.randn(141, 2, 64), torch.randn(141, 2, 64)
    k, v = prefill_keys_values(plan, key, value, torch.empty(0, 2, 8, dtype=torch.uint8), None, None, None, 1)
    assert k.data_ptr() == key[1:].data_ptr() and torch.equal(v, value[1:])


@pytest.mark.parametrize("method,settings,heads,kv_heads,head_size", [
    ("kivi", {"bits": 4}, 9, 3, 64),
    ("gear", {"bits": 4}, 8, 1, 128),
    ("kivi", {"bits": 2, "group_size": 32, "block_size": 16}, 14, 2, 64),
])
def test_keys_are_the_pages_then_the_chunk_and_attention_over_them_is_the_reference(
    method, settings, heads, kv_heads, head_size, device
):
    layout, iters = layout_for(method, head_size, **settings)
    bs = layout.block_size
    # a decode, then prefills: mid-block context, block-aligned context, none
    context, query = [100, 70, 2 * bs, 0], [1, 70, 30, 90]
    batch = make_batch(context, query, kv_heads, head_size, bs, device=device)
    cache, k_new, v_new = write_batch(batch, layout, iters)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=device)
    qsl = batch.query_start_loc()
    plan = plan_flash_prefill(qsl.numpy(), np.array(batch.seq_lens), 1, 3, bs, device)
    k, v = prefill_keys_values(plan, k_new, v_new, cache, batch.block_table, seq_lens, layout, 1)
    assert k.shape == (sum(batch.seq_lens[1:]), kv_heads, head_size) and k.dtype == k_new.dtype

    q = torch.randn(int(qsl[-1]), heads, head_size, device=device).bfloat16()
    expected = paged_attention(
        q.cpu(), k_new.cpu(), v_new.cpu(), qsl.tolist(), batch.seq_lens,
        lambda i, s: page_codec.read_sequence(cache.cpu(), batch.block_table[i].cpu(), s, layout), head_size ** -0.5,
    )
    cu_k, cu_q = plan.cu_seqlens_k.tolist(), plan.cu_seqlens_q.tolist()
    for i in range(3):
        row = i + 1
        k_ref, v_ref = page_codec.read_sequence(cache.cpu(), batch.block_table[row].cpu(), batch.seq_lens[row], layout)
        keys, values = k[cu_k[i] : cu_k[i + 1]].float().cpu(), v[cu_k[i] : cu_k[i + 1]].float().cpu()
        c = context[row]
        # stored tokens: the decode kernel's dequantization, rounded to bf16; chunk: the exact projections
        torch.testing.assert_close(keys[:c], k_ref[:c], atol=1e-2 * k_ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(values[:c], v_ref[:c], atol=1e-2 * v_ref.abs().max().item(), rtol=0)
        start = int(qsl[row])
        assert torch.equal(keys[c:], k_new[start : start + query[row]].float().cpu())
        assert torch.equal(values[c:], v_new[start : start + query[row]].float().cpu())
        # what FlashAttention computes on them (bottom-right causal) is the reference prefill
        rows = slice(plan.first_token + cu_q[i], plan.first_token + cu_q[i + 1])
        got = causal_attention(q[rows].cpu(), keys, values, head_size ** -0.5)
        torch.testing.assert_close(got, expected[rows], atol=2e-2, rtol=1.6e-2)
