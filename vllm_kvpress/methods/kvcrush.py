"""KVCrush: keep representatives of the evicted tokens, grouped by head behaviour.

Based on KVCrush (https://arxiv.org/abs/2503.00022): a token is described by a binary vector with
one bit per attention head (does this head attend to it?); tokens with similar vectors behave alike,
so a few representatives can stand in for the many an importance-only method would evict.

Once per request and layer, on the forward that completes the prompt (`eviction/scoring.py`):

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

Parameters (defaults in configs/kvcrush.yaml)
----------
budget, window, sink, observation_window : as for every eviction method (methods/eviction.py).
bits, group_size, block_size : as for KIVI (methods/kivi.py).
representative_fraction : float
    Share of the free budget spent on group representatives, in [0, 1); 0 is importance only.
anchor : str
    Anchor signature: "mean" (each head's majority bit), "zeros", "ones" or "alternating".
"""

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.methods.base import check_choice
from vllm_kvpress.methods.eviction import EvictionConfig

ALLOWED_ANCHORS = ("mean", "zeros", "ones", "alternating")
"""The paper's random anchor is left out: every run and tensor-parallel rank must pick the same
tokens from the same prompt, without sharing a seed."""


@dataclass(frozen=True)
class KVCrushConfig(EvictionConfig):
    method: ClassVar[str] = "kvcrush"

    representative_fraction: float
    """Share of the free budget (budget - sink - window) kept as group representatives."""
    anchor: str
    """Signature the Hamming distances are measured from."""

    def problems(self) -> list[str]:
        problems = super().problems()
        fraction = self.representative_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            problems.append(
                f"representative_fraction={fraction!r} is not allowed; allowed: a number in [0, 1)"
            )
        check_choice("anchor", self.anchor, ALLOWED_ANCHORS, problems)
        return problems
