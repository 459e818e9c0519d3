"""eviction/compaction.py: the worker's compaction of a prompt in vLLM-shaped pages equals the
reference engine's (TRITON_INTERPRET=1 on CPU), and the step's query bookkeeping is right."""

import pytest
import torch
from helpers import make_batch
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages

from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.reference import SequencePages
from vllm_kvpress.eviction.compaction import PromptCompaction, compact_prompt, window_queries
from vllm_kvpress.reference import page_codec


@pytest.mark.parametrize("method", ["snapkv", "scissorhands", "kvcrush"])
def test_worker_compaction_equals_reference_engine(method, device):
    config = load_method_config({"method": method, "budget": 48, "block_size": 16, "window": 8, "sink": 4,
                                 "observation_window": 8})
    layout = config.page_layout(64)
    num_heads, kv_heads, prompt_len, context = 6, 2, 150, 128  # GQA 3; the last chunk is 22 tokens
    bs = layout.block_size
    batch = make_batch([context], [prompt_len - context], kv_heads, 64, bs, device=device)
    k, v = batch.full_k[0], batch.full_v[0]
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    def write(key, value, slots):
        write_kv_pages(key, value, cache, slots, layout, power_iters=1)

    batch.write_context(write, bs)
    batch.write_new(write, bs)
    # the batch holds another request's 5 tokens first, so the row's queries start at 5
    query = torch.randn(5 + prompt_len - context, num_heads, 64).to(torch.bfloat16).to(device)
    kept_blocks = config.kept_prompt_blocks(prompt_len)
    assert kept_blocks == 3
    compaction = PromptCompaction(row=0, prompt_len=prompt_len, query_start=5, context_len=context,
                                  kept_blocks=kept_blocks)
    before = cache.clone()
    compact_prompt(config, layout, cache, batch.block_table[0], query, compaction, 0.125, power_iters=1)

    reference = SequencePages(layout, 1, kv_heads, prompt_len + 8, torch.device(device), eviction=config,
                              prompt_len=prompt_len)
    reference.append(k.to(torch.bfloat16), v.to(torch.bfloat16))
    k_stored, v_stored = page_codec.read_sequence(reference.cache, torch.arange(10), prompt_len, layout)
    reference.evict_prompt(query[5:].float(), k_stored, v_stored, 0.125)
    kept_tokens = kept_blocks * bs
    ref_k, ref_v = page_codec.read_sequence(reference.cache, torch.arange(10), kept_tokens, layout)
    out_k, out_v = page_codec.read_sequence(cache, batch.block_table[0], kept_tokens, layout)
    # the same tokens chosen and re-packed: equal up to the rounding of two dequantization paths
    torch.testing.assert_close(out_k, ref_k, atol=2e-2 * ref_k.abs().max().item(), rtol=0)
    torch.testing.assert_close(out_v, ref_v, atol=2e-2 * ref_v.abs().max().item(), rtol=0)
    # blocks past the kept ones, the tail included, are untouched
    row = batch.block_table[0].long()
    assert torch.equal(cache[row[kept_blocks:]], before[row[kept_blocks:]])
    assert not torch.equal(cache[row[:kept_blocks]], before[row[:kept_blocks]])


def test_window_queries_take_the_last_prompt_queries_of_the_chunk():
    query = torch.arange(40).float()[:, None, None].expand(40, 2, 4)
    # row starts at batch token 10; context 100; prompt 120: queries 10..29 are positions 100..119,
    # and batch tokens 30.. belong to tokens after the prompt (a re-prefill) or other rows
    c = PromptCompaction(row=1, prompt_len=120, query_start=10, context_len=100, kept_blocks=1)
    q, pos = window_queries(query, c, observation_window=8)
    assert pos.tolist() == list(range(112, 120))
    assert q[:, 0, 0].tolist() == [float(t) for t in range(22, 30)]
    q, pos = window_queries(query, c, observation_window=64)  # the chunk is shorter than the window
    assert pos.tolist() == list(range(100, 120)) and q.shape[0] == 20
