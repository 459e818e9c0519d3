"""Owns choosing which prompt tokens an eviction method keeps: window attention statistics, each
method's importance rule, and the always-kept sink and recent window.

One entry point, `select_kept_tokens`, serves the vLLM worker (GPU) and the reference engine (CPU).
It is plain PyTorch on whatever device its inputs are on, and never builds a P x P matrix: the only
attention it computes is that of the last `w <= observation_window` prompt queries over the P prompt
keys, w x P per query head, one KV head's query group at a time (memory O(group * w * P)).

    prompt positions:  0 .. sink-1 | ........ candidates ........ | P-window .. | C .. P-1
                       always kept | chosen by the method's score | always kept | tail, stays
    C = num_candidates = (P // block_size) * block_size: the tokens of full prompt blocks, the only
    ones compaction can move; the tail (the last partial block) stays where it is anyway.

Methods (config.method):
- snapkv (arXiv 2404.14469): per KV head, attention summed over the window and the GQA group,
  max-pooled over positions (`kernel_size`), top-k.
- scissorhands (arXiv 2305.17118): per KV head, how often a token is pivotal (its attention is above
  the query's average, 1 / number of visible keys) over the window queries of the group; ties
  broken by summed attention.
- kvcrush (arXiv 2503.00022): per layer (one row for every KV head), `1 - representative_fraction`
  of the free budget by summed attention of all heads, the rest one representative at a time from
  groups of the remaining tokens with equal Hamming distance between their head-behaviour signature
  and an anchor signature.
RazorAttention (arXiv 2407.15891) is not here: it keeps every token in retrieval heads, a per-head
budget that one block table per layer cannot turn into freed blocks.
"""

import torch

from vllm_kvpress.methods.kvcrush import ALLOWED_ANCHORS

SCORED_METHODS = ("snapkv", "scissorhands")
"""Methods whose rule is a per-KV-head score; the kept tokens are its top-k."""


def window_attention_stats(
    queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor, scale: float, *, count_pivotal: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per query head and key, the attention of the window queries summed over the window, and (with
    `count_pivotal`) how many window queries give the key more than their average attention.

    Args:
        queries: [w, num_heads, head_size] post-RoPE; query head h reads KV head h // group.
        query_positions: [w] absolute positions; key j (position j) is visible to a query at p iff j <= p.
        keys: [P, num_kv_heads, head_size] post-RoPE.
    Returns:
        attention_sum [num_heads, P] fp32, pivotal_count [num_heads, P] fp32 or None.
    """
    num_heads, num_kv_heads = queries.shape[1], keys.shape[1]
    group = num_heads // num_kv_heads
    num_keys = keys.shape[0]
    key_positions = torch.arange(num_keys, device=keys.device)
    hidden = key_positions[None, :] > query_positions[:, None]  # [w, P]
    # 1 / visible keys: a key above it gets more than a uniform share of the query's attention
    average = 1.0 / (~hidden).sum(1).clamp(min=1).float()  # [w]
    attention_sum = torch.empty(num_heads, num_keys, dtype=torch.float32, device=keys.device)
    pivotal_count = torch.empty_like(attention_sum) if count_pivotal else None
    for kv in range(num_kv_heads):  # one group at a time bounds memory at group * w * P
        heads = slice(kv * group, (kv + 1) * group)
        q = queries[:, heads].float().transpose(0, 1)  # [group, w, D]
        logits = torch.matmul(q, keys[:, kv].float().t()) * scale  # [group, w, P]
        probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
        attention_sum[heads] = probs.sum(1)
        if pivotal_count is not None:
            pivotal_count[heads] = (probs > average[None, :, None]).sum(1).float()
    return attention_sum, pivotal_count


def score_snapkv(attention_sum: torch.Tensor, num_kv_heads: int, kernel_size: int) -> torch.Tensor:
    """[num_heads, P] -> [num_kv_heads, P]: summed over the GQA group (SnapKV issue #22: a group
    shares one K/V, so it keeps one token set), then max-pooled so the neighbours of a strong token
    stay with it (SnapKV section 4.3: keeps the information of a token's context)."""
    per_kv = attention_sum.reshape(num_kv_heads, -1, attention_sum.shape[-1]).sum(1)
    if kernel_size == 1:
        return per_kv
    return torch.nn.functional.max_pool1d(per_kv[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]


def score_scissorhands(
    attention_sum: torch.Tensor, pivotal_count: torch.Tensor, num_kv_heads: int, num_queries: int
) -> torch.Tensor:
    """[num_heads, P] each -> [num_kv_heads, P]: pivotal counts of the group, ties broken by summed
    attention. One query's attention sums to 1, so the group's window sums to at most
    group * num_queries; divided by that + 1 it stays below 1 and cannot overturn a whole count."""
    num_keys = attention_sum.shape[-1]
    group = attention_sum.shape[0] // num_kv_heads
    counts = pivotal_count.reshape(num_kv_heads, group, num_keys).sum(1)
    attention = attention_sum.reshape(num_kv_heads, group, num_keys).sum(1)
    return counts + attention / (group * num_queries + 1.0)


def signature_distances(attention_sum: torch.Tensor, pool: torch.Tensor, anchor: str) -> torch.Tensor:
    """KVCrush's head-behaviour grouping of the tokens in `pool`.

    A token's signature has one bit per query head: its attention in that head is above the head's
    median over the pool (the median makes each bit split the pool in half, the most informative
    threshold). Tokens are grouped by the Hamming distance of their signature to the anchor.

    Args:
        attention_sum: [num_heads, P] window attention.
        pool: [n] positions of the tokens to group.
    Returns:
        [n] int64 distances in 0..num_heads (the group of each pool token).
    """
    per_head = attention_sum[:, pool]  # [H, n]
    bits = per_head > per_head.median(dim=1, keepdim=True).values
    num_heads = bits.shape[0]
    if anchor == "mean":  # the majority bit of each head
        anchor_bits = bits.float().mean(1) > 0.5
    elif anchor == "zeros":
        anchor_bits = torch.zeros(num_heads, dtype=torch.bool, device=bits.device)
    elif anchor == "ones":
        anchor_bits = torch.ones(num_heads, dtype=torch.bool, device=bits.device)
    elif anchor == "alternating":
        anchor_bits = torch.arange(num_heads, device=bits.device) % 2 == 1
    else:
        raise ValueError(f"anchor={anchor!r} is not allowed; allowed: {', '.join(ALLOWED_ANCHORS)}")
    return (bits != anchor_bits[:, None]).sum(0)


def pick_representatives(groups: torch.Tensor, importance: torch.Tensor, count: int) -> torch.Tensor:
    """Indices into the pool of `count` representatives: the most important token of every group
    first (so every group is represented when count >= number of groups), then further tokens in
    proportion to group size (a token of rank r >= 1 in a group of n competes with key (r + 0.5) / n,
    the Sainte-Lague rule), each group's tokens taken in order of importance.

    Args:
        groups: [n] int64 group of each pool token; importance: [n] float.
    """
    n = groups.numel()
    by_importance = torch.argsort(importance, descending=True, stable=True)
    order = by_importance[torch.argsort(groups[by_importance], stable=True)]  # grouped, importance desc
    sorted_groups = groups[order]
    sizes = torch.bincount(sorted_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n, device=groups.device) - starts[sorted_groups]
    key = (rank.double() + 0.5) / sizes[sorted_groups].double()
    key = torch.where(rank == 0, -1.0 / sizes[sorted_groups].double(), key)  # firsts before any second
    chosen = torch.argsort(key, stable=True)[:count]
    return order[chosen]


def _kvcrush_free_tokens(
    attention_sum: torch.Tensor, free: torch.Tensor, num_free: int, representative_fraction: float, anchor: str
) -> torch.Tensor:
    """[num_free] positions for one layer: importance top-k plus group representatives."""
    num_candidates = free.numel()
    importance = attention_sum[:, :num_candidates].sum(0)
    num_representatives = int(num_free * representative_fraction)
    num_important = num_free - num_representatives
    important = importance.masked_fill(~free, float("-inf")).topk(num_important).indices
    rest = free.clone()
    rest[important] = False
    pool = rest.nonzero()[:, 0]
    if num_representatives == 0:
        return important
    groups = signature_distances(attention_sum, pool, anchor)
    representatives = pool[pick_representatives(groups, importance[pool], num_representatives)]
    return torch.cat([important, representatives])


def _forced_positions(config, num_keys: int, num_candidates: int, num_keep: int, device) -> torch.Tensor:
    """The candidates kept whatever the scores: the first `sink`, and those at positions >= P - window.
    If they alone exceed num_keep (a fractional budget of a short prompt), the sink goes first, then
    the most recent."""
    sink = torch.arange(min(config.sink, num_candidates), device=device)
    first_recent = min(max(num_keys - config.window, sink.numel()), num_candidates)
    recent = torch.arange(first_recent, num_candidates, device=device)
    return torch.cat([sink, recent.flip(0)])[:num_keep]


def select_kept_tokens(
    config,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    num_candidates: int,
    num_keep: int,
) -> torch.Tensor:
    """The prompt tokens each KV head keeps, chosen by `config.method` from window attention.

    Args:
        config: an `EvictionConfig` subclass (snapkv, scissorhands, kvcrush).
        queries: [w, num_heads, head_size] post-RoPE, the last w <= config.observation_window prompt
            queries; query head h reads KV head h // (num_heads // num_kv_heads).
        query_positions: [w] int64 absolute positions of those queries.
        keys: [P, num_kv_heads, head_size] post-RoPE, every prompt token (dequantized from pages).
        scale: softmax scale.
        num_candidates: positions [0, num_candidates) may be evicted (the full prompt blocks).
        num_keep: tokens kept per KV head, at most num_candidates.
    Returns:
        int64 [num_kv_heads, num_keep]: distinct candidate positions, ascending per row, including
        the first `sink` and every candidate >= P - window (both truncated if they exceed num_keep).
    """
    num_keys, num_kv_heads, _ = keys.shape
    num_heads = queries.shape[1]
    if num_heads % num_kv_heads or queries.shape[0] != query_positions.shape[0]:
        raise ValueError(
            f"queries {tuple(queries.shape)} / positions {tuple(query_positions.shape)} do not match "
            f"keys {tuple(keys.shape)}: need [w, group * num_kv_heads, D] and [w]"
        )
    if not 0 <= num_keep <= num_candidates <= num_keys:
        raise ValueError(
            f"need 0 <= num_keep ({num_keep}) <= num_candidates ({num_candidates}) <= prompt tokens ({num_keys})"
        )
    device = keys.device
    forced = _forced_positions(config, num_keys, num_candidates, num_keep, device)
    num_free = num_keep - forced.numel()
    if num_free == 0:
        return forced.sort().values.expand(num_kv_heads, -1).contiguous()
    free = torch.ones(num_candidates, dtype=torch.bool, device=device)
    free[forced] = False

    method = config.method
    attention_sum, pivotal_count = window_attention_stats(
        queries, query_positions, keys, scale, count_pivotal=method == "scissorhands"
    )
    if method == "kvcrush":
        chosen = _kvcrush_free_tokens(
            attention_sum, free, num_free, config.representative_fraction, config.anchor
        ).expand(num_kv_heads, -1)
    elif method in SCORED_METHODS:
        if method == "snapkv":
            scores = score_snapkv(attention_sum, num_kv_heads, config.kernel_size)
        else:
            scores = score_scissorhands(attention_sum, pivotal_count, num_kv_heads, queries.shape[0])
        scores = scores[:, :num_candidates].masked_fill(~free, float("-inf"))
        chosen = scores.topk(num_free, dim=1).indices
    else:
        raise NotImplementedError(f"token eviction has no scoring rule for method {method!r}")
    kept = torch.cat([forced.expand(num_kv_heads, -1), chosen], dim=1)
    return kept.sort(dim=1).values
