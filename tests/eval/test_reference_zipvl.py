"""ZipVL on the reference engine (methods/zipvl.py): a long prompt's chunks attend to the part of
their context that holds tau of the probes' attention (sparse prefill), the prompt is split into
two precisions as mikv's (tests/eval/test_reference_mixed_precision.py covers the split itself)
ranked by normalized attention, and each split records the share the mass threshold asked for."""

import pytest
import torch
from helpers import reference_layer_call

from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.eval.engines.reference import SequencePages
from vllm_kvpress.eviction.attention_mass import ChosenRatios, normalized_attention, sparse_context, tokens_for_mass
from vllm_kvpress.eviction.scoring import window_attention_stats
from vllm_kvpress.reference.attention import causal_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 6, 2, 64
SCALE = HEAD_SIZE**-0.5
BLOCK_SIZE = 16
FIRST, SECOND = 96, 40
PROMPT_LEN = FIRST + SECOND
SETTINGS = {"block_size": BLOCK_SIZE, "window": 16, "sink": 4, "observation_window": 8, "budget": 32, "tau": 0.5}


@pytest.fixture
def qkv():
    generator = torch.Generator().manual_seed(2410)
    total = PROMPT_LEN + 2
    return (torch.randn(total, NUM_HEADS, HEAD_SIZE, generator=generator),
            torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator),
            torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator))


def _pages(config, prompt_len=PROMPT_LEN):
    return SequencePages(config.page_layout(HEAD_SIZE), 1, NUM_KV_HEADS, prompt_len + 2, torch.device("cpu"),
                         eviction=config, prompt_len=prompt_len)


def _prefill(config, q, k, v):
    pages = _pages(config)
    first = reference_layer_call(pages, q[:FIRST], k[:FIRST], v[:FIRST], SCALE)
    second = reference_layer_call(pages, q[FIRST:PROMPT_LEN], k[:PROMPT_LEN], v[:PROMPT_LEN], SCALE)
    return first, second


def test_a_long_prompts_later_chunk_attends_to_its_important_context(qkv):
    q, k, v = qkv
    sparse = load_method_config({"method": "zipvl", "sparse_prefill_from": PROMPT_LEN, **SETTINGS})
    dense = load_method_config({"method": "zipvl", "sparse_prefill_from": 0, **SETTINGS})
    first_sparse, second_sparse = _prefill(sparse, q, k, v)
    first_dense, second_dense = _prefill(dense, q, k, v)
    assert torch.equal(first_sparse, first_dense), "the first chunk has no context: dense either way"

    # the expectation, apart from the engine: the context as the pages hold it, the fresh chunk
    probe = _pages(dense)
    k_context, v_context = (x[:FIRST] for x in probe.append(k[:FIRST].bfloat16(), v[:FIRST].bfloat16()))
    chunk_k, chunk_v = k[FIRST:PROMPT_LEN].bfloat16().float(), v[FIRST:PROMPT_LEN].bfloat16().float()
    kept_k, kept_v, count = sparse_context(q[FIRST:PROMPT_LEN], torch.cat([k_context, chunk_k]),
                                           torch.cat([v_context, chunk_v]), FIRST, SCALE, tau=0.5, num_probes=8,
                                           sink=4, window=16)
    assert count < FIRST, "tau 0.5 drops part of the context"
    expected = causal_attention(q[FIRST:PROMPT_LEN], torch.cat([kept_k, chunk_k]), torch.cat([kept_v, chunk_v]),
                                SCALE)
    torch.testing.assert_close(second_sparse, expected, rtol=0, atol=1e-5)
    assert (second_sparse - second_dense).abs().max() > 1e-2


def test_a_prompt_shorter_than_sparse_prefill_from_prefills_densely(qkv):
    q, k, v = qkv
    below = load_method_config({"method": "zipvl", "sparse_prefill_from": PROMPT_LEN + 1, **SETTINGS})
    off = load_method_config({"method": "zipvl", "sparse_prefill_from": 0, **SETTINGS})
    for a, b in zip(_prefill(below, q, k, v), _prefill(off, q, k, v), strict=True):
        assert torch.equal(a, b)


def test_the_split_ranks_by_normalized_attention_and_records_the_share_tau_asks_for(qkv):
    q, k, v = qkv
    config = load_method_config({"method": "zipvl", "sparse_prefill_from": 0, **SETTINGS})
    ChosenRatios.drain()
    pages = _pages(config)
    reference_layer_call(pages, q[:FIRST], k[:FIRST], v[:FIRST], SCALE)
    assert ChosenRatios.drain() == {}, "no split before the prompt's last chunk"

    probe = _pages(config)
    k_prompt, _ = probe.append(k[:PROMPT_LEN].bfloat16(), v[:PROMPT_LEN].bfloat16())
    reference_layer_call(pages, q[FIRST:PROMPT_LEN], k[:PROMPT_LEN], v[:PROMPT_LEN], SCALE)
    assert pages.num_evicted > 0, "the split freed blocks"

    positions = torch.arange(PROMPT_LEN - 8, PROMPT_LEN)
    attention, _ = window_attention_stats(q[PROMPT_LEN - 8 : PROMPT_LEN], positions, k_prompt, SCALE,
                                          count_pivotal=False)
    normalized = normalized_attention(attention, positions).reshape(NUM_KV_HEADS, -1, PROMPT_LEN).sum(1)
    raw = attention.reshape(NUM_KV_HEADS, -1, PROMPT_LEN).sum(1)
    assert not torch.equal(normalized.argsort(dim=1), raw.argsort(dim=1)), "the case must tell them apart"
    assert ChosenRatios.drain() == {0: [pytest.approx(float(tokens_for_mass(normalized, 0.5)) / PROMPT_LEN)]}


def test_defaults_are_the_papers_bits_and_settings_are_checked():
    config = load_method_config({"method": "zipvl"})
    assert (config.high_bits, config.low_bits) == (4, 2)
    # 4-bit important and 2-bit other tokens: at least 4x fewer bytes than bf16 on a long prompt
    kept = config.kept_prompt_blocks(16000, 8, 128)
    assert kept * config.block_size / config.page_layout(128).compression_vs_bf16 / 16000 < 0.25
    for settings, message in [({"tau": 1.0}, "tau=1.0"), ({"tau": 0}, "tau=0"),
                              ({"sparse_prefill_from": -1}, "sparse_prefill_from=-1"),
                              ({"high_bits": 4, "low_bits": 4}, "low_bits=4 is not below high_bits=4")]:
        with pytest.raises(KVCompressionConfigError, match=message):
            load_method_config({"method": "zipvl", **settings})

