"""`select_kept_tokens` and the eviction methods.

- every method returns, per KV head, num_keep distinct sorted candidates including sink and window,
  for int and fractional budgets and GQA groups 1, 3 and 7;
- snapkv equals a brute-force reference (full attention, pooling, top-k) on small inputs;
- a key aligned with the window queries (a needle) survives a small budget in every method;
- kvcrush represents every signature group when its representative budget allows;
- the methods' defaults, and every validation message is what users read.
"""

import dataclasses

import pytest
import torch

from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.eviction import scoring
from vllm_kvpress.eviction.policy import kept_prompt_blocks
from vllm_kvpress.methods.kvcrush import pick_representatives, signature_distances
from vllm_kvpress.methods.scissorhands import score_scissorhands

METHODS = ("snapkv", "scissorhands", "kvcrush")
HEAD_SIZE = 64
BLOCK_SIZE = 16
SCALE = HEAD_SIZE**-0.5


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(20240417)


def _config(method: str, **overrides):
    settings = {"method": method, "block_size": BLOCK_SIZE, "budget": 64, "window": 16, "sink": 4,
                "observation_window": 8, **overrides}
    return load_method_config(settings)


def _inputs(generator, prompt_len: int, num_kv_heads: int, group: int, w: int):
    queries = torch.randn(w, num_kv_heads * group, HEAD_SIZE, generator=generator)
    keys = torch.randn(prompt_len, num_kv_heads, HEAD_SIZE, generator=generator)
    positions = torch.arange(prompt_len - w, prompt_len)
    return queries, positions, keys


def _select(config, queries, positions, keys):
    prompt_len = keys.shape[0]
    num_candidates = prompt_len // BLOCK_SIZE * BLOCK_SIZE
    num_keep = kept_prompt_blocks(prompt_len, config.budget, BLOCK_SIZE) * BLOCK_SIZE
    return scoring.select_kept_tokens(config, queries, positions, keys, SCALE, num_candidates, num_keep), (
        num_candidates, num_keep)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group", [1, 3, 7])
@pytest.mark.parametrize("budget", [48, 0.3], ids=["int", "fraction"])
def test_selection_invariants(generator, method, group, budget):
    config = _config(method, budget=budget)
    queries, positions, keys = _inputs(generator, 203, 2, group, 8)  # 12 full blocks + 11 tail tokens
    kept, (num_candidates, num_keep) = _select(config, queries, positions, keys)
    assert num_keep < num_candidates, "the case must evict something"
    assert kept.shape == (2, num_keep) and kept.dtype == torch.int64
    for row in kept:
        assert (row[1:] > row[:-1]).all(), f"not sorted and distinct: {row.tolist()}"
        assert row.min() >= 0 and row.max() < num_candidates
        must = set(range(config.sink)) | set(range(203 - config.window, num_candidates))
        assert must <= set(row.tolist()), f"missing sink/window {sorted(must - set(row.tolist()))}"
        assert len(set(row.tolist()) - must) == num_keep - len(must), "some kept tokens were not chosen"


def test_per_head_methods_choose_per_head_and_kvcrush_per_layer(generator):
    queries, positions, keys = _inputs(generator, 203, 3, 3, 8)
    for method in METHODS:
        kept, _ = _select(_config(method), queries, positions, keys)
        same = all(torch.equal(kept[0], row) for row in kept)
        assert same == (method == "kvcrush"), f"{method}: rows equal={same}"


def test_forced_tokens_beyond_the_budget_keep_the_sink_then_the_most_recent(generator):
    config = _config("snapkv", budget=0.1, window=40, sink=4)
    queries, positions, keys = _inputs(generator, 160, 1, 3, 8)
    kept = scoring.select_kept_tokens(config, queries, positions, keys, SCALE, 160, 16)
    assert kept[0].tolist() == [0, 1, 2, 3] + list(range(148, 160))


def _brute_force_snapkv_scores(queries, positions, keys, kernel_size):
    """[num_kv_heads, P] pooled scores from the window's attention, written out with loops."""
    num_keys, num_kv_heads, _ = keys.shape
    group = queries.shape[1] // num_kv_heads
    rows = []
    for kv in range(num_kv_heads):
        score = torch.zeros(num_keys)
        for h in range(kv * group, (kv + 1) * group):
            for i, p in enumerate(positions.tolist()):
                logits = keys[: p + 1, kv] @ queries[i, h] * SCALE
                score[: p + 1] += logits.softmax(0)
        rows.append(torch.stack([score[max(0, j - kernel_size // 2): j + kernel_size // 2 + 1].max()
                                 for j in range(num_keys)]))
    return torch.stack(rows)


@pytest.mark.parametrize("kernel_size", [1, 5])
def test_snapkv_equals_brute_force(generator, kernel_size):
    """The kept free tokens are a top-k of the brute-force pooled scores. Pooling makes a peak's
    neighbours tie, so with kernel_size > 1 the kept scores are compared, not the positions."""
    config = _config("snapkv", kernel_size=kernel_size)
    queries, positions, keys = _inputs(generator, 101, 2, 3, 6)
    kept = scoring.select_kept_tokens(config, queries, positions, keys, SCALE, 96, 48)
    pooled = _brute_force_snapkv_scores(queries, positions, keys, kernel_size)
    forced = set(range(config.sink)) | set(range(101 - config.window, 96))
    free = torch.tensor([j for j in range(96) if j not in forced])
    for kv, row in enumerate(kept.tolist()):
        assert forced <= set(row)
        chosen = torch.tensor(sorted(set(row) - forced))
        best = pooled[kv, free].topk(chosen.numel())
        torch.testing.assert_close(pooled[kv, chosen].sort().values, best.values.sort().values,
                                   msg=f"KV head {kv}: kept tokens are not a top-k")
        if kernel_size == 1:
            assert chosen.tolist() == sorted(free[best.indices].tolist())


def test_window_attention_stats_match_dense_attention(generator):
    queries, positions, keys = _inputs(generator, 70, 2, 3, 5)
    attention_sum, pivotal = scoring.window_attention_stats(queries, positions, keys, SCALE, count_pivotal=True)
    k = keys.repeat_interleave(3, dim=1)
    logits = torch.einsum("qhd,khd->hqk", queries, k) * SCALE
    hidden = torch.arange(70)[None, :] > positions[:, None]
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    torch.testing.assert_close(attention_sum, probs.sum(1), msg="attention summed over the window")
    visible = (~hidden).sum(1).float()
    torch.testing.assert_close(pivotal, (probs > 1 / visible[None, :, None]).sum(1).float(), msg="pivotal counts")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group", [1, 3, 7])
def test_a_needle_aligned_with_the_window_queries_is_kept(generator, method, group):
    """Key 57 points along the window queries of every head: it must beat random keys for every
    method while only 8 free slots exist among 164 candidates."""
    config = _config(method, budget=32, window=16, sink=8)
    queries, positions, keys = _inputs(generator, 200, 2, group, 8)
    for kv in range(2):
        direction = queries[:, kv * group:(kv + 1) * group].mean((0, 1))
        keys[57, kv] = 4.0 * direction / direction.norm() * HEAD_SIZE**0.5
    kept, _ = _select(config, queries, positions, keys)
    assert all(57 in row.tolist() for row in kept), f"{method}: needle evicted"


def test_scissorhands_ranks_by_pivotal_count_before_attention():
    attention_sum = torch.tensor([[0.5, 3.0, 0.2]])
    pivotal = torch.tensor([[4.0, 1.0, 4.0]])
    stats = scoring.WindowStats(attention_sum, pivotal, torch.randn(3, 1, HEAD_SIZE), num_kv_heads=1, num_queries=4)
    scores = score_scissorhands(stats)
    assert scores[0].argsort(descending=True).tolist() == [0, 2, 1]


@pytest.mark.parametrize("num_heads", [3, 9])
def test_kvcrush_representatives_cover_every_group(generator, num_heads):
    attention_sum = torch.rand(num_heads, 300, generator=generator)
    pool = torch.randperm(300, generator=generator)[:120]
    groups = signature_distances(attention_sum, pool, "mean")
    num_groups = groups.unique().numel()
    assert num_groups >= 3, "too few groups for the test to mean anything"
    importance = torch.rand(120, generator=generator)
    chosen = pick_representatives(groups, importance, num_groups)
    assert set(groups[chosen].tolist()) == set(groups.tolist())
    for g in groups.unique():  # each group's representative is its most important token
        members = (groups == g).nonzero()[:, 0]
        assert members[importance[members].argmax()] in chosen


def test_kvcrush_extra_representatives_follow_group_size():
    groups = torch.tensor([0] * 8 + [1] * 2)
    importance = torch.arange(10, 0, -1).float()
    chosen = pick_representatives(groups, importance, 5)
    assert sorted(groups[chosen].tolist()) == [0, 0, 0, 0, 1]


def test_kvcrush_keeps_every_signature_group_of_the_evicted_tokens(generator):
    config = _config("kvcrush", budget=96, representative_fraction=0.5)
    queries, positions, keys = _inputs(generator, 203, 1, 3, 8)
    kept, (num_candidates, num_keep) = _select(config, queries, positions, keys)
    attention_sum, _ = scoring.window_attention_stats(queries, positions, keys, SCALE, count_pivotal=False)
    forced = set(range(config.sink)) | set(range(203 - config.window, num_candidates))
    num_free = num_keep - len(forced)
    importance = attention_sum[:, :num_candidates].sum(0)
    free = torch.tensor([j not in forced for j in range(num_candidates)])
    important = set(importance.masked_fill(~free, -1).topk(num_free - num_free // 2).indices.tolist())
    assert important <= set(kept[0].tolist())
    pool = torch.tensor([j for j in range(num_candidates) if j not in forced and j not in important])
    groups = signature_distances(attention_sum, pool, config.anchor)
    kept_groups = {int(groups[i]) for i, j in enumerate(pool.tolist()) if j in set(kept[0].tolist())}
    assert groups.unique().numel() <= num_free // 2
    assert kept_groups == set(groups.tolist())


@pytest.mark.parametrize("anchor", ["zeros", "ones", "alternating"])
def test_kvcrush_anchors_measure_from_their_signature(anchor):
    attention_sum = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # bits: [1,1],[0,1],[1,0],[0,0]
    distances = signature_distances(attention_sum, torch.arange(4), anchor)
    expected = {"zeros": [2, 1, 1, 0], "ones": [0, 1, 1, 2], "alternating": [1, 0, 2, 1]}[anchor]
    assert distances.tolist() == expected


def test_bad_shapes_are_named(generator):
    queries, positions, keys = _inputs(generator, 64, 2, 3, 4)
    with pytest.raises(ValueError, match="num_keep \\(80\\) <= num_candidates \\(64\\)"):
        scoring.select_kept_tokens(_config("snapkv"), queries, positions, keys, SCALE, 64, 80)
    with pytest.raises(ValueError, match="do not match keys"):
        scoring.select_kept_tokens(_config("snapkv"), queries[:, :5], positions, keys, SCALE, 64, 32)


# --- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_defaults(method):
    config = load_method_config({"method": method})
    assert config.evicts_tokens and config.budget == 2048 and config.pages.bits == 8 and config.block_size == 64
    assert config.window == 64 and config.sink == 4
    assert config.problems_for_model(head_size=64, num_kv_heads=2, max_model_len=8192) == []


@pytest.mark.parametrize("method,settings,message", [
    ("snapkv", {"kernel_size": 4}, "snapkv: kernel_size=4 is not allowed; allowed: 1, 3, 5, 7, 9, 11, 13, 15"),
    ("kvcrush", {"representative_fraction": 1.0},
     "kvcrush: representative_fraction=1.0 is not allowed; allowed: a number in [0, 1)"),
    ("kvcrush", {"representative_fraction": "half"},
     "kvcrush: representative_fraction='half' is not allowed; allowed: a number in [0, 1)"),
    ("kvcrush", {"anchor": "random"},
     "kvcrush: anchor='random' is not allowed; allowed: 'mean', 'zeros', 'ones', 'alternating'"),
    ("scissorhands", {"budget": 1.5},
     "scissorhands: budget=1.5 is not allowed; allowed: a fraction of the prompt in (0, 1) or a token count"),
    ("scissorhands", {"budget": 32},
     "scissorhands: budget=32 is not allowed; allowed: at least one block (block_size=64) of tokens"),
    ("snapkv", {"budget": "all"}, "snapkv: budget='all' is not allowed; allowed: a token count or a fraction"),
    ("snapkv", {"window": -1}, "snapkv: window=-1 is not allowed; allowed: an integer from 0 to 1048576"),
    ("snapkv", {"sink": 1.0}, "snapkv: sink=1.0 is not allowed; allowed: an integer from 0 to 1048576"),
    ("kvcrush", {"observation_window": 0},
     "kvcrush: observation_window=0 is not allowed; allowed: an integer from 1 to 512"),
    ("snapkv", {"budget": 128, "window": 100, "sink": 30},
     "snapkv: window=100 + sink=30 exceed budget=128; allowed: window + sink <= budget"),
    ("snapkv", {"bits": 3}, "snapkv: bits=3 is not allowed; allowed: 2, 4, 8"),
    ("scissorhands", {"decode_interval": 100},
     ("scissorhands: decode_interval=100 is not allowed; allowed: 0 (evict after the prompt only) or a multiple "
      "of block_size=64")),
    ("scissorhands", {"decode_interval": -64},
     "scissorhands: decode_interval=-64 is not allowed; allowed: an integer from 0 to 1048576"),
    ("snapkv", {"decode_interval": 64, "decode_observation_window": 65},
     "snapkv: decode_observation_window=65 exceeds decode_interval=64; allowed: at most decode_interval"),
    ("kvcrush", {"decode_observation_window": 0},
     "kvcrush: decode_observation_window=0 is not allowed; allowed: an integer from 1 to 512"),
])
def test_every_validation_message(method, settings, message):
    with pytest.raises(KVCompressionConfigError) as info:
        load_method_config({"method": method, **settings})
    assert message in str(info.value)


def test_unknown_setting_lists_the_fields():
    with pytest.raises(KVCompressionConfigError) as info:
        load_method_config({"method": "scissorhands", "kernel_size": 7})
    assert ("unknown setting(s) kernel_size for method 'scissorhands'; allowed: bits, group_size, block_size, "
            "tail_keys, "
            "budget, window, sink, observation_window, decode_interval, decode_observation_window") in str(info.value)


def test_razor_has_no_decode_time_eviction():
    with pytest.raises(KVCompressionConfigError, match="unknown setting.s. decode_interval for method 'razor'"):
        load_method_config({"method": "razor", "decode_interval": 512})


def test_budget_larger_than_max_model_len_is_named():
    config = load_method_config({"method": "snapkv", "budget": 4096})
    assert config.problems_for_model(head_size=64, num_kv_heads=2, max_model_len=2048) == [(
        "budget=4096 is larger than the model's max_model_len=2048, so nothing would ever be evicted; "
        "allowed: a token count up to 2048, or a fraction in (0, 1)"
    )]
    fraction = dataclasses.replace(config, budget=0.25)
    assert fraction.problems_for_model(head_size=64, num_kv_heads=2, max_model_len=2048) == []
