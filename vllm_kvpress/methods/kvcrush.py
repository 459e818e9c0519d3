"""KVCrush: keep representatives of the evicted tokens, grouped by head behaviour.

Based on KVCrush (https://arxiv.org/abs/2503.00022): a token is described by a binary vector with
one bit per attention head (does this head attend to it?); tokens with similar vectors behave alike,
so a few representatives can stand in for the many an importance-only method would evict.

Once per request and layer, on the forward that completes the prompt (`eviction/scoring.py` forces
the sink and the window, `KVCrush.choose` below picks the rest):

1. The last `observation_window` prompt queries attend to every prompt token; A[h, j] is head h's
   attention to token j summed over the window.
2. Importance: I_j = sum_h A[h, j]. The top (1 - representative_fraction) of the free budget
   (budget - sink - window) by I is kept.
3. Signature of each remaining token: bit h = A[h, j] > median of A[h, .] over the remaining
   tokens. Group = Hamming distance of the signature to the `anchor` signature (0..num_heads).
4. The rest of the budget goes to representatives: the most important token of every group first,
   then further tokens in proportion to group size.
5. The same tokens are kept for every KV head of the layer, as the paper selects per layer.

Deviations from the paper: the paper groups evicted tokens into as many equal-size buckets of the
distance order as it has representatives and keeps one per bucket; here the groups are the distinct
distances, which guarantees that every group has a representative when the budget allows, and
inside a group the representative is the most important token rather than an arbitrary one. The
paper's random anchor is not offered (every run and tensor-parallel rank must agree without a
shared seed). The bit threshold is the per-head median (the paper thresholds attention; the median
makes each bit split the tokens evenly, as OpenVINO GenAI's KVCrush keeps the top half). As for the
other methods: the budget is rounded up to whole blocks, the last partial prompt block stays, sinks
are kept explicitly and the kept tokens are re-quantized into `bits`-bit pages (KVCrush's
combination with quantization).

Parameters (defaults: the fields below; configs/kvcrush.yaml writes them out)
----------
budget, window, sink, observation_window, decode_interval, decode_observation_window, pages : as for
    every eviction method (methods/eviction.py).
bits, group_size, block_size, tail_keys : of its pages (KIVI's, methods/kivi.py, unless `pages` names
    another quantizer: `{"pages": "gear", "bits": 4}` is KVCrush on GEAR 4-bit pages).
representative_fraction : float
    Share of the free budget spent on group representatives, in [0, 1); 0 is importance only.
anchor : str
    Anchor signature: "mean" (each head's majority bit), "zeros", "ones" or "alternating".
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm_kvpress.methods.base import Family, MethodInfo, check_choice
from vllm_kvpress.methods.eviction import TokenEviction

if TYPE_CHECKING:  # torch is imported where a rule runs: listing or validating methods stays light
    import torch

    from vllm_kvpress.eviction.scoring import WindowStats


def _alternating(bits: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.arange(bits.shape[0], device=bits.device) % 2 == 1


ANCHORS = {
    "mean": lambda bits: bits.float().mean(1) > 0.5,  # the majority bit of each head
    "zeros": lambda bits: bits.new_zeros(bits.shape[0]),
    "ones": lambda bits: bits.new_ones(bits.shape[0]),
    "alternating": _alternating,
}
"""Anchor signatures by name, each from the pool's bits [num_heads, n]. The paper's random anchor
is left out: every run and tensor-parallel rank must pick the same tokens from the same prompt,
without sharing a seed."""
ALLOWED_ANCHORS = tuple(ANCHORS)


def signature_distances(attention_sum: "torch.Tensor", pool: "torch.Tensor", anchor: str) -> "torch.Tensor":
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
    if anchor not in ANCHORS:
        raise ValueError(f"anchor={anchor!r} is not allowed; allowed: {', '.join(ANCHORS)}")
    return (bits != ANCHORS[anchor](bits)[:, None]).sum(0)


def pick_representatives(groups: "torch.Tensor", importance: "torch.Tensor", count: int) -> "torch.Tensor":
    """Indices into the pool of `count` representatives: the most important token of every group
    first (so every group is represented when count >= number of groups), then further tokens in
    proportion to group size (a token of rank r >= 1 in a group of n competes with key (r + 0.5) / n,
    the Sainte-Lague rule), each group's tokens taken in order of importance.

    Args:
        groups: [n] int64 group of each pool token; importance: [n] float.
    """
    import torch

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


def kvcrush_free_tokens(
    attention_sum: "torch.Tensor", free: "torch.Tensor", num_free: int, representative_fraction: float, anchor: str
) -> "torch.Tensor":
    """[num_free] positions for one layer: importance top-k plus group representatives."""
    import torch

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


@dataclass(frozen=True)
class KVCrush(TokenEviction):
    info: ClassVar[MethodInfo] = MethodInfo(
        "kvcrush", "KVCrush: KV-cache size reduction using similarity in head-behaviour", "2503.00022",
        Family.EVICTION, "binary head-behaviour signature per token; keep group representatives",
    )

    representative_fraction: float = 0.25
    """Share of the free budget (budget - sink - window) kept as group representatives: importance
    keeps three quarters; the last quarter (about 495 tokens at budget 2048) is far more than the at
    most num_heads + 1 signature groups, so every group is represented several times, in proportion
    to its size."""
    anchor: str = "mean"
    """Signature the Hamming distances are measured from: "mean", each head's majority bit, adapts
    to the prompt."""

    def problems(self) -> list[str]:
        problems = super().problems()
        fraction = self.representative_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            problems.append(
                f"representative_fraction={fraction!r} is not allowed; allowed: a number in [0, 1)"
            )
        check_choice("anchor", self.anchor, ALLOWED_ANCHORS, problems)
        return problems

    def choose(self, stats: "WindowStats", free: "torch.Tensor", num_free: int) -> "torch.Tensor":
        """One choice per layer, which every KV head keeps (the paper selects per layer)."""
        return kvcrush_free_tokens(stats.attention_sum, free, num_free, self.representative_fraction,
                                   self.anchor)[None]
