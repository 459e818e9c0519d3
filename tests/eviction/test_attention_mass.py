"""ZipVL's adaptive count (eviction/attention_mass.py): the fewest tokens holding a share tau of the
probes' attention, the normalization by how many probes see a key, and the sparse context a
prefill chunk attends to (its dropped attention bounded by 1 - tau)."""

import pytest
import torch

from vllm_kvpress.eviction.attention_mass import (
    ChosenRatios,
    extend_by_layer,
    important_share_report,
    mean_share_by_layer,
    normalized_attention,
    sparse_context,
    tokens_for_mass,
)
from vllm_kvpress.eviction.scoring import window_attention_stats
from vllm_kvpress.reference.attention import causal_attention

HEAD_SIZE = 32
SCALE = HEAD_SIZE**-0.5


def _brute_count(scores: torch.Tensor, tau: float) -> int:
    """The definition, one p at a time."""
    ranked = scores.sort(dim=-1, descending=True).values
    for p in range(1, scores.shape[-1] + 1):
        if (ranked[:, :p].sum(-1) / ranked.sum(-1)).mean() >= tau:
            return p
    return scores.shape[-1]


def test_the_count_averages_each_heads_share_of_its_mass():
    scores = torch.tensor([[8.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    # shares after p tokens: head 0 .8 .9 1 1 1, head 1 .2 .4 .6 .8 1 -> mean .5 .65 .8 .9 1
    assert [int(tokens_for_mass(scores, tau)) for tau in (0.5, 0.6, 0.7, 0.85, 0.95)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("tau", [0.3, 0.8, 0.95, 0.999])
def test_the_count_is_the_smallest_that_reaches_tau(tau):
    generator = torch.Generator().manual_seed(2410)
    scores = torch.rand(4, 300, generator=generator) ** 6  # a few large, most small
    count = int(tokens_for_mass(scores, tau))
    assert count == _brute_count(scores, tau)
    assert 1 <= count <= 300


def test_normalized_attention_divides_by_the_probes_that_see_a_key():
    attention_sum = torch.rand(2, 8)
    positions = torch.tensor([5, 6, 7])  # key 7 is seen by one probe, key 6 by two, keys <= 5 by three
    seen = torch.tensor([3, 3, 3, 3, 3, 3, 2, 1], dtype=torch.float32)
    torch.testing.assert_close(normalized_attention(attention_sum, positions), attention_sum / seen)


def _chunk(generator, context_len, num_new, num_heads, num_kv_heads, loud=()):
    """Queries of a chunk, and K/V of context + chunk; the context keys at `loud` point along the
    probes' queries, so they draw most of the attention."""
    q = torch.randn(num_new, num_heads, HEAD_SIZE, generator=generator)
    k = torch.randn(context_len + num_new, num_kv_heads, HEAD_SIZE, generator=generator) * 0.5
    v = torch.randn(context_len + num_new, num_kv_heads, HEAD_SIZE, generator=generator)
    group = num_heads // num_kv_heads
    for position in loud:
        k[position] = (3 * q[-4:].mean(0).reshape(num_kv_heads, group, HEAD_SIZE).mean(1)
                       + 0.01 * torch.randn(num_kv_heads, HEAD_SIZE, generator=generator))  # distinct rows
    return q, k, v


def test_the_sparse_context_keeps_the_attended_tokens_the_sink_and_the_window():
    generator = torch.Generator().manual_seed(1)
    context_len, loud = 200, (50, 90, 130)
    q, k, v = _chunk(generator, context_len, 24, 4, 2, loud)
    k_kept, v_kept, count = sparse_context(q, k, v, context_len, SCALE, tau=0.5, num_probes=4, sink=4, window=16)
    assert 4 + 16 <= count < context_len // 2
    assert k_kept.shape == v_kept.shape == (count, 2, HEAD_SIZE)
    for head in range(2):
        kept = [int(torch.nonzero((k[:context_len, head] == row).all(-1))[0]) for row in k_kept[:, head]]
        assert kept == sorted(kept), "in position order"
        assert set(range(4)) | set(range(context_len - 16, context_len)) | set(loud) <= set(kept)
        torch.testing.assert_close(v_kept[:, head], v[kept, head])


@pytest.mark.parametrize("tau", [0.6, 0.9, 0.99])
def test_the_attention_the_sparse_context_drops_is_bounded_by_one_minus_tau(tau):
    """Over the probes and a KV head's query group, the mean attention on dropped context tokens is
    at most 1 - tau, so the probes' outputs move by at most 2 (1 - tau) max|v| on average."""
    generator = torch.Generator().manual_seed(7)
    context_len, num_new, probes = 300, 32, 8
    q, k, v = _chunk(generator, context_len, num_new, 4, 1)
    k_kept, v_kept, count = sparse_context(q, k, v, context_len, SCALE, tau=tau, num_probes=probes, sink=0,
                                           window=0)
    assert count < context_len or tau == 0.99
    dense = causal_attention(q[-probes:], k, v, SCALE)
    sparse = causal_attention(q[-probes:], torch.cat([k_kept, k[context_len:]]),
                              torch.cat([v_kept, v[context_len:]]), SCALE)
    error = (sparse - dense).abs().amax(-1).mean()
    assert error <= 2 * (1 - tau) * v.abs().max()
    # ... and it is no looser than that: the dropped probabilities themselves
    positions = torch.arange(context_len + num_new - probes, context_len + num_new)
    attention, _ = window_attention_stats(q[-probes:], positions, k, SCALE, count_pivotal=False)
    kept_positions = [int(torch.nonzero((k[:context_len, 0] == row).all(-1))[0]) for row in k_kept[:, 0]]
    dropped = torch.ones(context_len, dtype=torch.bool)
    dropped[kept_positions] = False
    assert attention[:, :context_len][:, dropped].sum() / (4 * probes) <= 1 - tau + 1e-6


def test_recorded_ratios_are_drained_once_by_layer():
    """vLLM's worker runs every compacting request of a step layer by layer: records of several
    requests interleave, and the layer each was made in groups them."""
    ChosenRatios.drain()
    for layer, first, second in ((0, 3, 1), (1, 2, 4)):
        with ChosenRatios.at_layer(layer):
            ChosenRatios.record(torch.tensor(first) / 8)
            ChosenRatios.record(torch.tensor(second) / 8)
    drained = ChosenRatios.drain()
    assert drained == {0: [0.375, 0.125], 1: [0.25, 0.5]}
    assert mean_share_by_layer(drained) == [0.25, 0.375]
    gathered = {0: [0.5]}  # what an engine holds from earlier generations (or another worker)
    extend_by_layer(gathered, drained.items())
    assert gathered == {0: [0.5, 0.375, 0.125], 1: [0.25, 0.5]}
    assert important_share_report(mean_share_by_layer(drained)) == {"important_share_by_layer": [0.25, 0.375]}
    assert ChosenRatios.drain() == {} and important_share_report([]) is None
