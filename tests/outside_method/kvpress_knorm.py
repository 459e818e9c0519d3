"""KNorm: a KV-compression method that lives outside vllm-kvpress, as another package ships one.

The test installs this module as the distribution `kvpress-knorm`, whose entry point
`vllm_kvpress.methods: knorm = kvpress_knorm:KNorm` makes `--kv-compression knorm` known to every
vLLM process; nothing in vllm_kvpress/ names it.

Based on "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (Devoto et al.,
arXiv 2406.11430): a key of low L2 norm tends to draw high attention, so the tokens whose keys have
the lowest norm are the ones to keep; no attention score is needed. Everything else (the budget,
the always-kept sink and recent window, compaction into 8-bit pages, the blocks returned to vLLM)
comes from `TokenEviction`.
"""

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.methods.base import Family, MethodInfo, check_choice
from vllm_kvpress.methods.eviction import TokenEviction


@dataclass(frozen=True)
class KNorm(TokenEviction):
    info: ClassVar[MethodInfo] = MethodInfo(
        "knorm", "A simple and effective L2 norm-based strategy for KV cache compression", "2406.11430",
        Family.EVICTION, "keep the tokens whose keys have the lowest L2 norm (no attention scores)",
    )

    norm: int = 2
    """Which norm ranks the keys: 2 (the paper's) or 1."""

    def problems(self) -> list[str]:
        problems = super().problems()
        check_choice("norm", self.norm, (1, 2), problems)
        return problems

    def score(self, stats):
        # [P, num_kv_heads, D] keys -> [num_kv_heads, P]; the lowest norm scores highest
        return -stats.keys.float().norm(p=self.norm, dim=-1).t()
