"""The reference engine's compressed attention mirrors the vLLM backend's semantics.

- `SequencePages` (incremental decode of complete blocks) returns exactly what
  `page_codec.read_sequence` decodes from the same cache;
- a prefill chunk attends to pages for the past and to its own fresh K/V; a decode step reads
  everything from pages;
- with K/V that 4-bit pages hold exactly, compressed attention equals plain attention.
"""

import types

import pytest
import torch

from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.reference import PAGES_KWARG, SequencePages, compressed_attention_forward
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import causal_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 6, 2, 64
"""GQA group 3, like SmolLM2."""
SCALE = HEAD_SIZE**-0.5
BLOCK_SIZE = 16
# Steps of one sequence: prefill chunks that end mid-block and on a block edge, then decode
# steps that complete a block (the re-encode from staged tokens) and start the next.
STEPS = [23, 9, 1, 1, 14, 1, 1, 1]


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def _method(name: str, **overrides):
    return load_method_config({"method": name, "block_size": BLOCK_SIZE, **overrides})


def _pages(method_config, max_tokens: int) -> SequencePages:
    layout = method_config.page_layout(HEAD_SIZE)
    return SequencePages(
        layout, getattr(method_config, "power_iters", 1), NUM_KV_HEADS, max_tokens, torch.device("cpu")
    )


@pytest.mark.parametrize("method", [("kivi", {"bits": 2}), ("gear", {"bits": 4})], ids=["kivi2", "gear4"])
def test_incremental_decode_equals_read_sequence(generator, method):
    config = _method(method[0], **method[1])
    pages = _pages(config, sum(STEPS))
    for num_new in STEPS:
        k = torch.randn(num_new, NUM_KV_HEADS, HEAD_SIZE, generator=generator).bfloat16()
        v = torch.randn(num_new, NUM_KV_HEADS, HEAD_SIZE, generator=generator).bfloat16()
        k_all, v_all = pages.append(k, v)
        block_table = torch.arange(pages.cache.shape[0])
        k_ref, v_ref = page_codec.read_sequence(pages.cache, block_table, pages.num_tokens, pages.layout)
        torch.testing.assert_close(k_all, k_ref, rtol=0, atol=0, msg=f"K after {pages.num_tokens} tokens")
        torch.testing.assert_close(v_all, v_ref, rtol=0, atol=0, msg=f"V after {pages.num_tokens} tokens")
    assert pages.num_complete_blocks == sum(STEPS) // BLOCK_SIZE


def _grid_kv(num_tokens: int, generator) -> torch.Tensor:
    """Half-integers -7.5..7.5 that 4-bit pages hold exactly in every form they use: every token
    has -7.5 and +7.5 in every 8 channels (per-token and per-channel-group staging, symmetric or
    not: scale 1), and every channel of every block has both (per-channel K of a complete block:
    scale 1, zero -7.5)."""
    x = torch.randint(0, 16, (num_tokens, NUM_KV_HEADS, HEAD_SIZE), generator=generator).float() - 7.5
    for start in range(0, num_tokens, BLOCK_SIZE):
        x[start] = -7.5
        if start + 1 < num_tokens:
            x[start + 1] = 7.5
    x[:, :, 0::8], x[:, :, 1::8] = -7.5, 7.5
    return x


def _call(q_new, k_seen, v_seen, pages):
    """compressed_attention_forward as transformers calls it (DynamicCache holds k_seen/v_seen)."""
    module = types.SimpleNamespace(layer_idx=0)
    out, weights = compressed_attention_forward(
        module,
        q_new.transpose(0, 1)[None],
        k_seen.transpose(0, 1)[None],
        v_seen.transpose(0, 1)[None],
        attention_mask=None,
        scaling=SCALE,
        **({PAGES_KWARG: [pages]} if pages is not None else {}),
    )
    assert weights is None
    return out[0]


def test_compressed_equals_plain_when_pages_are_exact(generator):
    pages = _pages(_method("kivi", bits=4, group_size="head"), sum(STEPS))
    k, v = _grid_kv(sum(STEPS), generator), _grid_kv(sum(STEPS), generator)
    seen = 0
    for num_new in STEPS:
        q = torch.randn(num_new, NUM_HEADS, HEAD_SIZE, generator=generator)
        end = seen + num_new
        compressed = _call(q, k[:end], v[:end], pages)
        plain = _call(q, k[:end], v[:end], None)
        torch.testing.assert_close(compressed, plain, rtol=0, atol=1e-6, msg=f"step ending at token {end}")
        seen = end


def test_prefill_reads_the_past_from_pages_and_its_own_tokens_fresh(generator):
    config = _method("kivi", bits=2)
    pages, oracle = _pages(config, sum(STEPS)), _pages(config, sum(STEPS))
    k = torch.randn(sum(STEPS), NUM_KV_HEADS, HEAD_SIZE, generator=generator).bfloat16()
    v = torch.randn(sum(STEPS), NUM_KV_HEADS, HEAD_SIZE, generator=generator).bfloat16()
    seen = 0
    for num_new in STEPS:
        end = seen + num_new
        q = torch.randn(num_new, NUM_HEADS, HEAD_SIZE, generator=generator)
        out = _call(q, k[:end], v[:end], pages)
        k_pages, v_pages = oracle.append(k[seen:end], v[seen:end])
        if num_new > 1:  # prefill: fresh K/V for this chunk's tokens
            k_pages = torch.cat([k_pages[:seen], k[seen:end].float()])
            v_pages = torch.cat([v_pages[:seen], v[seen:end].float()])
        expected = causal_attention(q, k_pages, v_pages, SCALE)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6, msg=f"step ending at token {end}")
        plain = causal_attention(q, k[:end].float(), v[:end].float(), SCALE)
        if seen > 0:  # 2-bit pages must change the result once a past exists
            assert (out - plain).abs().max() > 1e-3, f"compression had no effect at token {end}"
        seen = end


def test_pages_out_of_step_with_the_model_cache_raise(generator):
    pages = _pages(_method("kivi"), 64)
    q = torch.randn(2, NUM_HEADS, HEAD_SIZE, generator=generator)
    k = torch.randn(5, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    with pytest.raises(RuntimeError, match="pages hold 0 tokens, the model cache 3"):
        _call(q, k, k, pages)
