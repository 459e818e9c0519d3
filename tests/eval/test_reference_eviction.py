"""The reference engine evicts as the vLLM worker will: after the attention of the chunk that
completes the prompt, compacting the kept tokens into the first blocks, the tail after them (and
with decode_interval again at every decode-time eviction point).

- after compaction the pages hold kept_blocks * block_size + tail tokens: the kept ones are the
  tokens `select_kept_tokens` picks (re-quantized), the tail's bytes are unchanged;
- decode steps then attend to kept + tail + decoded tokens;
- with a budget that keeps the whole prompt nothing changes: outputs and pages equal kivi's.
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
PROMPT_CHUNKS = [40, 35]  # prompt of 75 tokens: 4 full blocks + an 11-token tail
PROMPT_LEN = sum(PROMPT_CHUNKS)
DECODE_STEPS = 7  # the 7th completes the tail's block after compaction
EVICTION = {"block_size": BLOCK_SIZE, "bits": 8, "group_size": "head", "window": 16, "sink": 4,
            "observation_window": 8}


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(75)


def _pages(config, prompt_len=PROMPT_LEN):
    evicts = config.evicts_tokens
    return SequencePages(config.page_layout(HEAD_SIZE), 1, NUM_KV_HEADS, PROMPT_LEN + DECODE_STEPS,
                         torch.device("cpu"), eviction=config if evicts else None, prompt_len=prompt_len)


def _call(q_new, k_seen, v_seen, pages):
    return reference_layer_call(pages, q_new, k_seen, v_seen, SCALE)


def _sequence(generator):
    total = PROMPT_LEN + DECODE_STEPS
    q = torch.randn(total, NUM_HEADS, HEAD_SIZE, generator=generator)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    v = torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    return q, k, v


def _run(pages, q, k, v):
    """Feed the prompt in chunks, then decode steps; outputs of every step."""
    return reference_layer_steps(pages, q, k, v, PROMPT_CHUNKS + [1] * DECODE_STEPS, SCALE)


@pytest.mark.parametrize("method", ["snapkv", "scissorhands", "kvcrush"])
def test_compaction_keeps_the_selected_tokens_then_the_tail(generator, method):
    config = load_method_config({"method": method, "budget": 32, **EVICTION})
    q, k, v = _sequence(generator)
    pages = _pages(config)
    _call(q[:40], k[:40], v[:40], pages)
    assert pages.num_evicted == 0, "evicted before the prompt was complete"
    k_before, v_before = pages.append(k[40:PROMPT_LEN].bfloat16(), v[40:PROMPT_LEN].bfloat16())
    # what the worker will see: the prompt from pages, the last chunk's last queries
    pages = _pages(config)
    _call(q[:40], k[:40], v[:40], pages)
    out = _call(q[40:PROMPT_LEN], k[:PROMPT_LEN], v[:PROMPT_LEN], pages)
    assert pages.num_evicted == 64 - 32
    assert pages.num_tokens == 32 + PROMPT_LEN % BLOCK_SIZE

    window = q[PROMPT_LEN - 8 : PROMPT_LEN]
    kept = select_kept_tokens(config, window, torch.arange(PROMPT_LEN - 8, PROMPT_LEN), k_before, SCALE, 64, 32)
    block_table = torch.arange(pages.cache.shape[0])
    k_now, v_now = page_codec.read_sequence(pages.cache, block_table, pages.num_tokens, pages.layout)
    for h in range(NUM_KV_HEADS):
        # re-quantized at 8 bits: within about one code step of the values read before
        torch.testing.assert_close(k_now[:32, h], k_before[kept[h], h], rtol=0, atol=0.05, msg=f"K head {h}")
        torch.testing.assert_close(v_now[:32, h], v_before[kept[h], h], rtol=0, atol=0.05, msg=f"V head {h}")
    assert torch.equal(k_now[32:], k_before[64:]) and torch.equal(v_now[32:], v_before[64:]), "tail changed"
    # the prompt's own chunk attended before eviction: to the whole prompt
    full = causal_attention(q[40:PROMPT_LEN], torch.cat([k_before[:40], k[40:PROMPT_LEN].bfloat16().float()]),
                            torch.cat([v_before[:40], v[40:PROMPT_LEN].bfloat16().float()]), SCALE)
    torch.testing.assert_close(out, full, rtol=0, atol=1e-6, msg="prompt chunk output")

    # decode reads kept + tail + decoded tokens from the pages
    for step in range(DECODE_STEPS):
        end = PROMPT_LEN + step + 1
        out = _call(q[end - 1 : end], k[:end], v[:end], pages)
        k_all, v_all = page_codec.read_sequence(pages.cache, block_table, pages.num_tokens, pages.layout)
        assert k_all.shape[0] == 32 + PROMPT_LEN % BLOCK_SIZE + step + 1
        torch.testing.assert_close(out, causal_attention(q[end - 1 : end], k_all, v_all, SCALE), rtol=0, atol=1e-6)
    assert pages.num_complete_blocks == 3, "the tail's block completed after compaction"


def test_eviction_changes_the_decode_output(generator):
    """Guards the test above against a no-op: the compacted past must differ from the full one."""
    evicting = load_method_config({"method": "snapkv", "budget": 32, **EVICTION})
    keeping = load_method_config({"method": "kivi", "bits": 8, "group_size": "head", "block_size": BLOCK_SIZE,
                                  "tail_keys": "staged"})  # as every evicting method stores them
    q, k, v = _sequence(generator)
    a, b = _run(_pages(evicting), q, k, v), _run(_pages(keeping), q, k, v)
    assert torch.equal(a[0], b[0]), "the first chunk cannot see any eviction"
    assert (a[-1] - b[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["snapkv", "scissorhands", "kvcrush"])
def test_a_budget_that_keeps_the_prompt_equals_kivi(generator, method):
    evicting = load_method_config({"method": method, "budget": 96, **EVICTION})
    keeping = load_method_config({"method": "kivi", "bits": 8, "group_size": "head", "block_size": BLOCK_SIZE,
                                  "tail_keys": "staged"})  # as every evicting method stores them
    q, k, v = _sequence(generator)
    pages_evicting, pages_keeping = _pages(evicting), _pages(keeping)
    for step, (a, b) in enumerate(zip(_run(pages_evicting, q, k, v), _run(pages_keeping, q, k, v), strict=True)):
        assert torch.equal(a, b), f"step {step}"
    assert pages_evicting.num_evicted == 0
    assert torch.equal(pages_evicting.cache, pages_keeping.cache)


@pytest.mark.parametrize("method", ["snapkv", "scissorhands", "kvcrush"])
def test_decode_time_rounds_keep_the_sink_the_recent_window_and_the_budget(generator, method):
    """decode_interval 16: rounds at (4 + m) * 16 tokens after the 75-token prompt (4 full blocks).
    After each, the pages hold the budget's 3 blocks and the tokens since; every KV head keeps the
    4 sink tokens and the 16 most recent candidates, and the rest are the method's choice under
    the last 4 queries of the view's candidates."""
    config = load_method_config({"method": method, "budget": 48, **EVICTION, "decode_interval": 16,
                                 "decode_observation_window": 4})
    total = 98
    q = torch.randn(total, NUM_HEADS, HEAD_SIZE, generator=generator)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    v = torch.randn(total, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    pages = SequencePages(config.page_layout(HEAD_SIZE), 1, NUM_KV_HEADS, total, torch.device("cpu"),
                          eviction=config, prompt_len=PROMPT_LEN)
    views = []  # the stored tokens each round saw
    evict_recent = pages.evict_recent
    pages.evict_recent = lambda k_view, v_view, scale: (views.append(k_view), evict_recent(k_view, v_view, scale))
    block_table = torch.arange(pages.cache.shape[0])
    exact_k = k.bfloat16().float()  # what the pages were written from
    seen = 0
    for num_new in PROMPT_CHUNKS + [1] * (total - PROMPT_LEN):
        end = seen + num_new
        _call(q[seen:end], k[:end], v[:end], pages)
        seen = end
        assert (len(views) == 1) == (80 <= end < 96) and (len(views) == 2) == (end >= 96)
        if end in (80, 96):  # a round: the candidates are every stored token (all complete here)
            assert pages.num_tokens == 48 and pages.num_evicted == end - 48
            k_now, _ = page_codec.read_sequence(pages.cache, block_table, 48, pages.layout)
            # which original token each kept one is (8-bit codes: the nearest key by far)
            origin = torch.cdist(k_now.transpose(0, 1), exact_k[:end].transpose(0, 1)).argmin(-1)  # [Hkv, 48]
            for h in range(NUM_KV_HEADS):
                kept = set(origin[h].tolist())
                assert len(kept) == 48
                assert set(range(4)) <= kept and set(range(end - 16, end)) <= kept, f"head {h}"
            # the rest is the method's choice under the sequence's last 4 queries, in view positions
            k_view = views[-1]
            view_positions = torch.arange(end - 4, end) - (end - k_view.shape[0])
            chosen = select_kept_tokens(config, q[end - 4 : end], view_positions, k_view, SCALE,
                                        k_view.shape[0], 48)
            for h in range(NUM_KV_HEADS):
                expected = torch.cdist(k_view[chosen[h], h][None], exact_k[:end, h][None]).argmin(-1)[0]
                assert origin[h].tolist() == expected.tolist(), f"head {h}"
    assert pages.num_tokens == 48 + 2
