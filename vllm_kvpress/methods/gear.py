"""GEAR: quantization plus error correction, laid out to fit fixed-size pages.

Based on GEAR (https://arxiv.org/abs/2403.05527): X ~ D + L + S, a quantized matrix D, a low-rank
matrix L and a sparse matrix S.

Per complete block and KV head, for K and for V separately (reference/gear.py, the kernels' oracle):

1. S: the `outliers` entries whose z-score within their quantization group, |x - mean_g| / std_g,
   is largest; they are left out of the group's min/max.
2. D: KIVI-style quantization (K per channel, V per token) of the remaining entries.
3. L: rank-`rank` approximation a b^T of the residual R = X - dequant(D) (outlier positions
   zeroed), by `power_iters` steps of power iteration with deflation.
4. S values: x - dequant(D) - L at the outlier positions, so those entries become exact (to fp16).

Deviations from the paper, forced by paged memory (docs/quantized_pages.md): the low-rank factors
and outlier slots are per block (GEAR computes them per whole prompt), the number of outliers
per block is fixed so the page size is fixed, and tokens of a not-yet-full block are stored
quantized per token without correction until the block completes.

Parameters (defaults: the fields of `Gear` below; configs/gear.yaml writes them out)
----------
bits, group_size, block_size, tail_keys : as for KIVI (methods/kivi.py).
rank : int
    Rank of the per-block residual, 0 to 4.
outliers : int or "auto"
    Sparse outlier slots per block, head and tensor: 0, 16, 32 or 64; "auto" (the default) takes
    AUTO_OUTLIERS[bits].
power_iters : int
    Power-iteration steps per rank, 1 to 8.
"""

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.layout import PageLayout
from vllm_kvpress.methods.base import Family, MethodInfo, check_choice, check_range
from vllm_kvpress.methods.kivi import Kivi

ALLOWED_OUTLIERS = (0, 16, 32, 64)
"""Multiples of 16 because the kernels apply outliers with a one-hot matrix product."""
AUTO_OUTLIERS = {2: 16, 4: 0, 8: 0}
"""`outliers: auto` by bit width. At 2 bits the slots remove about a tenth of KIVI's V error on top
of the low-rank term; at 4 bits they bought no measurable quality on SmolLM2 (docs/results/
quality_cpu_reference) but cost the decode kernel 15% of its bandwidth and the block encode 2.3x of
its time (docs/quantized_pages.md)."""
MAX_RANK = 4
MAX_POWER_ITERS = 8


@dataclass(frozen=True)
class Gear(Kivi):
    info: ClassVar[MethodInfo] = MethodInfo(
        "gear", "GEAR: near-lossless generative inference with KV-cache compression", "2403.05527",
        Family.ERROR_CORRECTION,
        "KIVI-style quantization + per-block low-rank residual + sparse outlier slots (by default at 2 bits only)",
    )

    group_size: int | str = "head"
    """Channels per V quantization group: the whole head, since the low-rank term corrects what one
    group per token loses. 4 bits at head_dim 128: 152 bytes per token and head, 3.37x the bf16
    capacity (docs/quantized_pages.md)."""
    rank: int = 1
    """Rank of the per-block low-rank residual."""
    outliers: int | str = "auto"
    """Sparse outlier slots per block, head and tensor, or "auto": 16 at 2 bits, none at 4 and 8
    (`AUTO_OUTLIERS` says why)."""
    power_iters: int = 3
    """Power-iteration steps per rank."""

    def problems(self) -> list[str]:
        problems = super().problems()
        check_range("rank", self.rank, 0, MAX_RANK, problems)
        check_choice("outliers", self.outliers, ALLOWED_OUTLIERS + ("auto",), problems)
        check_range("power_iters", self.power_iters, 1, MAX_POWER_ITERS, problems)
        return problems

    @property
    def outlier_slots(self) -> int:
        """Outlier slots per block, head and tensor, with "auto" resolved by the bit width."""
        return AUTO_OUTLIERS[self.bits] if self.outliers == "auto" else self.outliers

    def page_layout(self, head_size: int) -> PageLayout:
        return PageLayout(
            head_size=head_size,
            block_size=self.block_size,
            k_bits=self.bits,
            v_bits=self.bits,
            v_group_size=self.v_group_size(head_size),
            rank=self.rank,
            num_outliers=self.outlier_slots,
            exact_tail_keys=self.exact_tail_keys,
        )
