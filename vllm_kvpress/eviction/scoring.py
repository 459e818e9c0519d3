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

The rule that picks among the candidates is the method's own (`TokenEviction.choose`, in
methods/<name>.py: snapkv, scissorhands, kvcrush); this module computes what every rule reads, the
window statistics, and forces the sink and the recent window. RazorAttention (arXiv 2407.15891) is
not here: it keeps every token in retrieval heads (eviction/headwise.py).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowStats:
    """What the last window queries saw of the prompt: the input of every selection rule."""

    attention_sum: torch.Tensor
    """fp32 [num_heads, P]: per query head and key, the window queries' attention summed over them."""
    pivotal_count: torch.Tensor | None
    """fp32 [num_heads, P]: how many window queries give the key more than their average attention
    (1 / visible keys); None unless the method asks for it (`counts_pivotal`)."""
    keys: torch.Tensor
    """[P, num_kv_heads, head_size]: every prompt key, post-RoPE, as the pages hold it."""
    num_kv_heads: int
    num_queries: int
    """Window queries, w."""
    query_positions: torch.Tensor | None = None
    """int64 [w] absolute positions of the window queries (a key at j is seen by those at >= j)."""

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA): query head h reads KV head h // group."""
        return self.attention_sum.shape[0] // self.num_kv_heads

    def per_kv_head(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """[num_heads, P] -> [num_kv_heads, P] (`per_kv_head`)."""
        return per_kv_head(per_query_head, self.num_kv_heads)


def per_kv_head(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[num_heads, P] -> [num_kv_heads, P], summed over each KV head's query group: a group shares
    one K/V, so it keeps one token set (SnapKV issue #22)."""
    return per_query_head.reshape(num_kv_heads, -1, per_query_head.shape[-1]).sum(1)


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


def forced_positions(sink: int, window: int, num_keys: int, num_candidates: int, num_keep: int,
                      device) -> torch.Tensor:
    """The candidates kept whatever the scores: the first `sink`, and those at positions >= P - window.
    If they alone exceed num_keep (a fractional budget of a short prompt), the sink goes first, then
    the most recent."""
    sink = torch.arange(min(sink, num_candidates), device=device)
    first_recent = min(max(num_keys - window, sink.numel()), num_candidates)
    recent = torch.arange(first_recent, num_candidates, device=device)
    return torch.cat([sink, recent.flip(0)])[:num_keep]


def select_kept_tokens(
    method,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    num_candidates: int,
    num_keep: int,
) -> torch.Tensor:
    """The prompt tokens each KV head keeps: the sink and the recent window, then `method.choose`
    over the window statistics.

    Args:
        method: a `TokenEviction` (methods/eviction.py): its sink, window, `counts_pivotal` and
            `choose`.
        queries: [w, num_heads, head_size] post-RoPE, the last w <= method.observation_window prompt
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
    forced = forced_positions(method.sink, method.window, num_keys, num_candidates, num_keep, device)
    num_free = num_keep - forced.numel()
    if num_free == 0:
        return forced.sort().values.expand(num_kv_heads, -1).contiguous()
    free = torch.ones(num_candidates, dtype=torch.bool, device=device)
    free[forced] = False

    attention_sum, pivotal_count = window_attention_stats(
        queries, query_positions, keys, scale, count_pivotal=method.counts_pivotal
    )
    stats = WindowStats(attention_sum, pivotal_count, keys, num_kv_heads, queries.shape[0], query_positions)
    chosen = method.choose(stats, free, num_free).expand(num_kv_heads, -1)
    kept = torch.cat([forced.expand(num_kv_heads, -1), chosen], dim=1)
    return kept.sort(dim=1).values
