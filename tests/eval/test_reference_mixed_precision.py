"""The reference engine splits a prompt into two precisions as MiKV does (methods/mikv.py): after
the attention of the chunk that completes the prompt, the important tokens become complete
high-precision blocks, every other full-block token low-precision units packed behind them
(mixed_layout.py), the tail moves after those, and the blocks after it are freed.

- decode steps attend to important + demoted + tail + decoded tokens, each read at its precision;
- a budget that keeps the whole prompt changes nothing: outputs and pages equal 8-bit kivi's;
- the demoted tokens are read: keeping them brings decode closer to the full cache than evicting.
"""


import pytest
import torch
from helpers import reference_layer_call, reference_layer_steps

from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.reference import SequencePages
from vllm_kvpress.eviction.scoring import select_kept_tokens
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import causal_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 6, 2, 64
SCALE = HEAD_SIZE**-0.5
BLOCK_SIZE = 16
PROMPT_CHUNKS = [40, 35]  # 75 tokens: 4 full blocks and an 11-token tail
PROMPT_LEN = sum(PROMPT_CHUNKS)
FULL_BLOCKS = PROMPT_LEN // BLOCK_SIZE
DECODE_STEPS = 7  # the 7th completes the tail's block
SETTINGS = {"block_size": BLOCK_SIZE, "window": 16, "sink": 4, "observation_window": 8}
IMPORTANT = 32  # two blocks


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(2402)


def _pages(config):
    return SequencePages(config.page_layout(HEAD_SIZE), 1, NUM_KV_HEADS, PROMPT_LEN + DECODE_STEPS,
                         torch.device("cpu"), eviction=config if config.evicts_tokens else None,
                         prompt_len=PROMPT_LEN)


def _call(q_new, k_seen, v_seen, pages):
    return reference_layer_call(pages, q_new, k_seen, v_seen, SCALE)


def _sequence(generator):
    total = PROMPT_LEN + DECODE_STEPS
    return (torch.randn(total, NUM_HEADS, HEAD_SIZE, generator=generator),
            torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator),
            torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator))


def _run(pages, q, k, v):
    """Feed the prompt in chunks, then decode steps; outputs of every step."""
    return reference_layer_steps(pages, q, k, v, PROMPT_CHUNKS + [1] * DECODE_STEPS, SCALE)


def _encoded(key, value, layout):
    """key/value [n, Hkv, D] written as complete pages of `layout` and read back (fp32)."""
    blocks = key.shape[0] // layout.block_size
    cache = torch.zeros(blocks, NUM_KV_HEADS, layout.bytes_per_head, dtype=torch.uint8)
    page_codec.write_tokens(cache, key.bfloat16(), value.bfloat16(), torch.arange(key.shape[0]), layout, 1)
    return page_codec.read_sequence(cache, torch.arange(blocks), key.shape[0], layout)


def test_decode_reads_important_tokens_high_the_others_low_then_the_tail(generator):
    config = load_method_config({"method": "mikv", "budget": IMPORTANT, **SETTINGS})
    high, low = config.page_layout(HEAD_SIZE), config.low_page_layout(HEAD_SIZE)
    packing = config.middle_packing(NUM_KV_HEADS, HEAD_SIZE)
    low_blocks = packing.middle_blocks(FULL_BLOCKS, IMPORTANT // BLOCK_SIZE)
    kept_blocks = IMPORTANT // BLOCK_SIZE + low_blocks
    assert kept_blocks < FULL_BLOCKS, "the case must free a block"
    q, k, v = _sequence(generator)

    # what the worker reads back before compaction: the prompt from the pages
    probe = _pages(config)
    _call(q[:40], k[:40], v[:40], probe)
    k_prompt, v_prompt = probe.append(k[40:PROMPT_LEN].bfloat16(), v[40:PROMPT_LEN].bfloat16())

    pages = _pages(config)
    _call(q[:40], k[:40], v[:40], pages)
    assert pages.num_evicted == 0
    _call(q[40:PROMPT_LEN], k[:PROMPT_LEN], v[:PROMPT_LEN], pages)
    assert pages.num_evicted == (FULL_BLOCKS - kept_blocks) * BLOCK_SIZE

    # the expectation, built apart from the engine: the chosen tokens at 8 bits, the others at 2
    candidates = FULL_BLOCKS * BLOCK_SIZE
    kept = select_kept_tokens(config, q[PROMPT_LEN - 8 : PROMPT_LEN], torch.arange(PROMPT_LEN - 8, PROMPT_LEN),
                              k_prompt, SCALE, candidates, IMPORTANT)
    demoted = torch.stack([
        torch.tensor([t for t in range(candidates) if t not in set(kept[h].tolist())])
        for h in range(NUM_KV_HEADS)
    ])
    heads = torch.arange(NUM_KV_HEADS)
    high_k, high_v = _encoded(k_prompt[kept.t(), heads], v_prompt[kept.t(), heads], high)
    low_k, low_v = _encoded(k_prompt[demoted.t(), heads], v_prompt[demoted.t(), heads], low)
    assert (low_k - k_prompt[demoted.t(), heads]).abs().mean() > 4 * (high_k - k_prompt[kept.t(), heads]).abs().mean()
    past_k = torch.cat([high_k, low_k, k_prompt[candidates:]])
    past_v = torch.cat([high_v, low_v, v_prompt[candidates:]])

    for step in range(DECODE_STEPS):
        end = PROMPT_LEN + step + 1
        out = _call(q[end - 1 : end], k[:end], v[:end], pages)
        # the decoded tokens go to the tail's block, staged at 8 bits as any token
        tail = PROMPT_LEN % BLOCK_SIZE + step + 1
        tail_blocks = torch.arange(kept_blocks, kept_blocks + -(-tail // BLOCK_SIZE))
        tail_k, tail_v = page_codec.read_sequence(pages.cache, tail_blocks, tail, high)
        keys, values = torch.cat([past_k[:candidates], tail_k]), torch.cat([past_v[:candidates], tail_v])
        expected = causal_attention(q[end - 1 : end], keys, values, SCALE)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5, msg=f"decode step {step}")
    assert pages.num_complete_blocks == kept_blocks + 1, "the tail's block completed after the split"


def test_a_budget_that_keeps_the_prompt_equals_8_bit_kivi(generator):
    mixed = load_method_config({"method": "mikv", "budget": FULL_BLOCKS * BLOCK_SIZE, **SETTINGS})
    plain = load_method_config({"method": "kivi", "bits": 8, "group_size": "head", "block_size": BLOCK_SIZE,
                                "tail_keys": "staged"})  # the pages of mikv's important tokens
    q, k, v = _sequence(generator)
    pages_mixed, pages_plain = _pages(mixed), _pages(plain)
    for step, (a, b) in enumerate(zip(_run(pages_mixed, q, k, v), _run(pages_plain, q, k, v), strict=True)):
        assert torch.equal(a, b), f"step {step}"
    assert pages_mixed.num_evicted == 0 and torch.equal(pages_mixed.cache, pages_plain.cache)


def test_keeping_the_demoted_tokens_brings_decode_closer_to_the_full_cache(generator):
    """The same important tokens with the others evicted (snapkv's scorer aside, the same budget
    and forced tokens) against kept at 2 bits: the full 8-bit cache is the reference."""
    mixed = load_method_config({"method": "mikv", "budget": IMPORTANT, **SETTINGS})
    evicting = load_method_config({"method": "snapkv", "budget": IMPORTANT, "bits": 8, "group_size": "head",
                                   "kernel_size": 1, **SETTINGS})
    full = load_method_config({"method": "kivi", "bits": 8, "group_size": "head", "block_size": BLOCK_SIZE,
                               "tail_keys": "staged"})
    q, k, v = _sequence(generator)
    reference = _run(_pages(full), q, k, v)[-1]
    error_mixed = (_run(_pages(mixed), q, k, v)[-1] - reference).abs().mean()
    error_evicting = (_run(_pages(evicting), q, k, v)[-1] - reference).abs().mean()
    assert error_mixed < 0.75 * error_evicting, (error_mixed, error_evicting)
