"""SnapKV: the observation-window baseline the other eviction methods are compared against.

Based on SnapKV (https://arxiv.org/abs/2404.14469): "LLM knows what you are looking for before
generation" - the attention of the last prompt queries already points at the tokens generation
will read.

Once per request, on the forward that completes the prompt (`eviction/scoring.py`):

1. The last `observation_window` prompt queries attend to every prompt token (w x P, causal).
2. Per KV head, the attention is summed over the window and the GQA group:
   s_j = sum_{q in window, h in group} softmax(q_h K^T * scale)_j.
3. s is max-pooled over positions with `kernel_size` (a token's neighbours stay with it).
4. The top-(budget - sink - window) tokens by pooled s are kept, plus the sink and the window;
   everything is compacted into the request's first blocks (KIVI-style pages, `bits`).

Deviations from the paper: the budget is rounded up to whole blocks and the last partial prompt
block stays unscored (only full blocks can be freed); SnapKV keeps the observation window itself,
here the `window` most recent tokens (at least as many, by default) are kept; attention sinks
(`sink`) are kept explicitly; the kept tokens are re-quantized into `bits`-bit pages.

Parameters (defaults in configs/snapkv.yaml)
----------
budget, window, sink, observation_window : as for every eviction method (methods/eviction.py).
bits, group_size, block_size : as for KIVI (methods/kivi.py).
kernel_size : int
    Width of the 1-D max pooling over positions, odd, 1 (no pooling) to 15.
"""

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.methods.base import check_choice
from vllm_kvpress.methods.eviction import EvictionConfig

ALLOWED_KERNEL_SIZES = (1, 3, 5, 7, 9, 11, 13, 15)
"""Odd, so that the pooling window is centred on the token."""


@dataclass(frozen=True)
class SnapKVConfig(EvictionConfig):
    method: ClassVar[str] = "snapkv"

    kernel_size: int
    """Width of the max pooling of window attention over positions."""

    def problems(self) -> list[str]:
        problems = super().problems()
        check_choice("kernel_size", self.kernel_size, ALLOWED_KERNEL_SIZES, problems)
        return problems
