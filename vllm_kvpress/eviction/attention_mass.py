"""Owns ZipVL's adaptive count of important tokens (arXiv 2410.08584): the fewest tokens that hold a
share `tau` of the attention the probe queries pay, ranked by normalized attention, and the sparse
context a prefill chunk attends to.

    p = min { p : sum_{j <= p} a_sorted(j) >= tau * sum_j a(j) }

`a` is a token's attention from the probe queries normalized by how many of them see it (a causal
mask hides a recent token from the earlier probes; without the normalization recent tokens would
rank low for being seen less). The share is taken per KV head and averaged over a layer's KV heads:
one count per layer, as the paper's ratio, while each KV head keeps its own top p.

Plain PyTorch on whatever device the inputs are on; it serves the reference engine and the vLLM
worker alike.
"""

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch

from vllm_kvpress.eviction.scoring import forced_positions, per_kv_head, window_attention_stats

logger = logging.getLogger("vllm.kvpress")
MAX_RECORDED_RATIOS = 1 << 16
"""Ratios kept undrained: a process that never drains (a vLLM worker) holds at most this many."""


class ChosenRatios:
    """The share of its prompt each layer's mass threshold asked for, by layer, until drained: the
    caller that runs a layer's selection names the layer (`at_layer`), the rule records. Kept as
    device tensors: recording never waits for the GPU."""

    _ratios: ClassVar[deque[tuple[int | None, torch.Tensor]]] = deque(maxlen=MAX_RECORDED_RATIOS)
    _layer: ClassVar[int | None] = None

    @classmethod
    @contextmanager
    def at_layer(cls, layer: int) -> Iterator[None]:
        """Records made inside belong to model layer `layer`."""
        outer, cls._layer = cls._layer, layer
        try:
            yield
        finally:
            cls._layer = outer

    @classmethod
    def record(cls, ratio: torch.Tensor) -> None:
        cls._ratios.append((cls._layer, ratio))
        if logger.isEnabledFor(logging.DEBUG):  # reading the ratio waits for the GPU: only when asked
            logger.debug("vllm-kvpress: layer %s asked for %.3f of the prompt", cls._layer, float(ratio))

    @classmethod
    def drain(cls) -> dict[int | None, list[float]]:
        """Layer -> its ratios in the order recorded (one per selection: per request and step)."""
        by_layer: dict[int | None, list[float]] = {}
        for layer, ratio in cls._ratios:
            by_layer.setdefault(layer, []).append(float(ratio))
        cls._ratios.clear()
        return by_layer


def extend_by_layer(by_layer: dict[int | None, list[float]],
                    records: Iterable[tuple[int | None, list[float]]]) -> None:
    """Add drained records, (layer, shares) pairs (`ChosenRatios.drain().items()`, or what vLLM's
    workers return), to `by_layer`."""
    for layer, shares in records:
        by_layer.setdefault(layer, []).extend(shares)


def mean_share_by_layer(by_layer: dict[int | None, list[float]]) -> list[float]:
    """`ChosenRatios.drain()`'s records -> each layer's mean share, in layer order."""
    # a selection no caller placed (None) sorts first
    ordered = sorted(by_layer.items(), key=lambda item: (item[0] is not None, item[0] or 0))
    return [sum(shares) / len(shares) for _, shares in ordered]


def important_share_report(shares: list[float]) -> dict[str, list[float]] | None:
    """The eval engines' `selection_report` of per-layer shares (None where nothing was recorded)."""
    return {"important_share_by_layer": [round(share, 4) for share in shares]} if shares else None


def normalized_attention(attention_sum: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """[num_heads, P] attention summed over the probe queries -> the mean over the probes that see
    each key (key j is seen by the probes at positions >= j)."""
    key_positions = torch.arange(attention_sum.shape[-1], device=attention_sum.device)
    seen_by = (query_positions[:, None] >= key_positions[None, :]).sum(0).clamp(min=1)
    return attention_sum / seen_by.to(attention_sum.dtype)


def tokens_for_mass(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """The fewest tokens per KV head whose scores hold a share `tau` of the total, the shares of
    `scores` [num_kv_heads, N] (non-negative) averaged over its KV heads: an int64 scalar tensor
    between 1 and N (on the scores' device: no wait for the GPU)."""
    ranked = scores.sort(dim=-1, descending=True).values
    share = ranked.cumsum(-1) / ranked.sum(-1, keepdim=True).clamp(min=torch.finfo(ranked.dtype).tiny)
    return ((share.mean(0) < tau).sum() + 1).clamp(max=scores.shape[-1])


def sparse_context(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context_len: int,
    scale: float,
    *,
    tau: float,
    num_probes: int,
    sink: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The context a prefill chunk attends to under ZipVL's sparse prefill: per KV head its `p`
    most attended context tokens (p from `tokens_for_mass`), always with the first `sink` and the
    last `window` context tokens, in position order.

    Args:
        queries: [T, num_heads, head_size] the chunk's post-RoPE queries; its last `num_probes` are
            the probes (every context token is visible to them).
        keys, values: [context_len + T, num_kv_heads, head_size]: the context, then the chunk.
        context_len: stored tokens before the chunk.
    Returns:
        K, V [count, num_kv_heads, head_size] of the kept context tokens, and `count`, the
        tokens each KV head keeps (sink and window included).
    """
    num_new = queries.shape[0]
    probes = min(num_probes, num_new)
    positions = torch.arange(context_len + num_new - probes, context_len + num_new, device=keys.device)
    attention_sum, _ = window_attention_stats(queries[-probes:].float(), positions, keys, scale,
                                              count_pivotal=False)
    num_kv_heads = keys.shape[1]
    scores = per_kv_head(normalized_attention(attention_sum, positions), num_kv_heads)[:, :context_len]
    # the whole context is a candidate and may be kept: every sink and window token is forced
    forced = forced_positions(sink, window, context_len, context_len, context_len, keys.device)
    count = max(int(tokens_for_mass(scores, tau)), forced.numel())  # a prefill step is eager
    chosen = scores.index_fill(1, forced, float("inf")).topk(count, dim=1).indices.sort(dim=1).values
    heads = torch.arange(num_kv_heads, device=keys.device)
    return keys[chosen.t(), heads], values[chosen.t(), heads], count
