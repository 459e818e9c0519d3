"""zipvl's sparse prefill through KVPressMetadataBuilder + KVPressImpl over vLLM-shaped steps (CPU
interpreter): the builder marks the prefill rows whose prompt prefills sparsely, and the
FlashAttention prefill attends to the context the method picks for each chunk
(backend/flash_prefill.py `sparse_keys_values`), equal to the reference engine's sparse prefill.
FlashAttention itself does not run on a CPU: a stand-in with its varlen semantics (causal, aligned
to the bottom right) takes its place; the GPU tests run the real one."""

import sys
import types

import numpy as np
import pytest
import torch
from helpers import impl_for, run_steps_against_reference

from vllm_kvpress.backend.flash_prefill import plan_flash_prefill, sparse_keys_values
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.worker_extension import SelectionRecords
from vllm_kvpress.eviction.attention_mass import sparse_context
from vllm_kvpress.reference.attention import causal_attention

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model
BS = 16
PROMPT = 230
SETTINGS = {"method": "zipvl", "budget": 48, "block_size": BS, "window": 8, "sink": 4, "observation_window": 8,
            "tau": 0.5, "sparse_prefill_from": PROMPT}
STEPS = [(0, 96), (96, 160), (160, 230), (230, 231), (231, 232)]


def _varlen_attention(q, k, v, *, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, softmax_scale, causal,
                      out, fa_version):
    """FlashAttention's `flash_attn_varlen_func`, causal: each sequence's queries are the last of
    its keys."""
    assert causal
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_k == max(b - a for a, b in zip(cu_k, cu_k[1:], strict=False))
    for i in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        out[rows] = causal_attention(q[rows], k[keys], v[keys], softmax_scale).to(out.dtype)
    return out


@pytest.fixture
def flash_attention_stand_in(monkeypatch):
    module = types.ModuleType("vllm.vllm_flash_attn")
    module.flash_attn_varlen_func = _varlen_attention
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", module)


def test_the_chunks_of_a_long_prompt_attend_to_the_context_zipvl_picks(v2_engine_config, monkeypatch,
                                                                      flash_attention_stand_in):
    vllm_config = v2_engine_config(block_size=BS, additional_config={"kv_compression": SETTINGS})
    method = load_method_config(SETTINGS)
    impl = impl_for(vllm_config, monkeypatch, HEADS, KV_HEADS, HEAD_SIZE)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))
    builder.fa_version = 3  # as on an H100, which the CPU builder cannot ask for

    def check(context, seq_len, metadata):
        prefill = seq_len - context > 1
        assert (metadata.flash_prefill is not None) == prefill
        if prefill:  # a chunk with context, in a prompt of sparse_prefill_from tokens
            assert metadata.flash_prefill.sparse_seqs == ((0,) if context else ())

    records = SelectionRecords()
    records.drain_important_shares()
    reference = run_steps_against_reference(impl, builder, method, STEPS, PROMPT, HEADS, "cpu", check=check)
    assert reference.num_evicted > 0, "the prompt was split after its last chunk"
    # the worker's split and the reference engine's each recorded the layer's share once, under its
    # index: what eval's vLLM engine reads from the workers (worker_extension_cls)
    [(layer, shares)] = records.drain_important_shares()
    assert layer == 0 and len(shares) == 2 and shares[0] == pytest.approx(shares[1]) and 0 < shares[0] <= 1


def test_a_prompt_below_sparse_prefill_from_has_no_sparse_rows(v2_engine_config, monkeypatch,
                                                               flash_attention_stand_in):
    settings = {**SETTINGS, "sparse_prefill_from": PROMPT + 1}
    vllm_config = v2_engine_config(block_size=BS, additional_config={"kv_compression": settings})
    impl = impl_for(vllm_config, monkeypatch, HEADS, KV_HEADS, HEAD_SIZE)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))
    builder.fa_version = 3

    def check(context, seq_len, metadata):
        if metadata.flash_prefill is not None:
            assert metadata.flash_prefill.sparse_seqs == ()

    run_steps_against_reference(impl, builder, load_method_config(settings), STEPS, PROMPT, HEADS, "cpu",
                                check=check)


def test_without_flash_attention_a_sparse_step_is_refused(v2_engine_config, monkeypatch):
    from helpers import single_request_step_metadata

    vllm_config = v2_engine_config(block_size=BS, additional_config={"kv_compression": SETTINGS})
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))
    builder.fa_version = None
    table = torch.arange(PROMPT // BS + 1, dtype=torch.int32)[None]
    with pytest.raises(NotImplementedError, match="zipvl.*FlashAttention prefill only"):
        single_request_step_metadata(builder, table, 96, 160, torch.arange(96, 160), PROMPT, "cpu")


def test_the_sparse_workspace_replaces_only_the_sparse_rows_context():
    """Three prefill rows: the first without context, the second sparse, the third dense."""
    generator = torch.Generator().manual_seed(3)
    query_lens, contexts = [20, 24, 16], [0, 150, 70]
    starts = np.concatenate([[0], np.cumsum(query_lens)])
    plan = plan_flash_prefill(starts, np.add(query_lens, contexts), 0, 3, BS, "cpu", 3, sparse_seqs=(0, 1))
    assert plan.sparse_seqs == (1,), "a row without context has nothing to skip"
    k_ws = torch.randn(plan.total_keys, KV_HEADS, HEAD_SIZE, generator=generator)
    v_ws = torch.randn_like(k_ws)
    query = torch.randn(plan.num_tokens, HEADS, HEAD_SIZE, generator=generator)
    method = load_method_config(SETTINGS)
    k, v, cu_k, max_k = sparse_keys_values(plan, query, k_ws, v_ws, method.prefill_context, 0.125)

    cu = plan.cu_seqlens_k.tolist()
    kept_k, kept_v, count = sparse_context(query[20:44], k_ws[cu[1] : cu[2]], v_ws[cu[1] : cu[2]], 150, 0.125,
                                           tau=0.5, num_probes=8, sink=4, window=8)
    assert count < 150
    lengths = [20, count + 24, 86]
    assert cu_k.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist() and max_k == max(lengths)
    torch.testing.assert_close(k[:20], k_ws[:20])
    torch.testing.assert_close(k[20 : 20 + count], kept_k)
    torch.testing.assert_close(v[20 : 20 + count], kept_v)
    torch.testing.assert_close(k[20 + count : 44 + count], k_ws[cu[1] + 150 : cu[2]])
    torch.testing.assert_close(k[44 + count :], k_ws[cu[2] :])
    torch.testing.assert_close(v[44 + count :], v_ws[cu[2] :])
