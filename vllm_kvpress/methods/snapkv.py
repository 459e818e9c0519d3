"""SnapKV: the observation-window baseline the other eviction methods are compared against.

Based on SnapKV (https://arxiv.org/abs/2404.14469): "LLM knows what you are looking for before
generation" - the attention of the last prompt queries already points at the tokens generation
will read.

Once per request, on the forward that completes the prompt (`eviction/scoring.py` forces the sink
and the window, `SnapKV.score` below ranks the rest):

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

Parameters (defaults: the fields below; configs/snapkv.yaml writes them out)
----------
budget, window, sink, observation_window, decode_interval, decode_observation_window, pages : as for
    every eviction method (methods/eviction.py).
bits, group_size, block_size, tail_keys : of its pages (KIVI's, methods/kivi.py, unless `pages` names
    another quantizer).
kernel_size : int
    Width of the 1-D max pooling over positions, odd, 1 (no pooling) to 15.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm_kvpress.methods.base import Family, MethodInfo, check_choice
from vllm_kvpress.methods.eviction import TokenEviction

if TYPE_CHECKING:  # torch is imported where the rule runs: listing or validating methods stays light
    import torch

    from vllm_kvpress.eviction.scoring import WindowStats

ALLOWED_KERNEL_SIZES = (1, 3, 5, 7, 9, 11, 13, 15)
"""Odd, so that the pooling window is centred on the token."""


def score_snapkv(stats: "WindowStats", kernel_size: int) -> "torch.Tensor":
    """[num_kv_heads, P]: the window attention summed over each GQA group, then max-pooled so the
    neighbours of a strong token stay with it (SnapKV section 4.3: keeps the information of a
    token's context)."""
    import torch

    per_kv = stats.per_kv_head(stats.attention_sum)
    if kernel_size == 1:
        return per_kv
    return torch.nn.functional.max_pool1d(per_kv[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]


@dataclass(frozen=True)
class SnapKV(TokenEviction):
    info: ClassVar[MethodInfo] = MethodInfo(
        "snapkv", "SnapKV: LLM knows what you are looking for before generation", "2404.14469", Family.EVICTION,
        "baseline: pooled attention of the last prompt queries picks the kept tokens per KV head",
    )

    kernel_size: int = 7
    """Width of the max pooling of window attention over positions (SnapKV's published 7, with its
    observation window of 32)."""

    def problems(self) -> list[str]:
        problems = super().problems()
        check_choice("kernel_size", self.kernel_size, ALLOWED_KERNEL_SIZES, problems)
        return problems

    def score(self, stats: "WindowStats") -> "torch.Tensor":
        return score_snapkv(stats, self.kernel_size)
