"""MiKV: no token left behind. The tokens an eviction method would drop stay, in low precision.

Based on "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision
Quantization" (https://arxiv.org/abs/2402.18096): evicting tokens loses context (and with it
safety and faithfulness); keeping the evicted tokens at 2-4 bits recovers most of it, while the
important tokens keep high precision.

Once per request, on the forward that completes the prompt:

1. Importance: the last `observation_window` prompt queries' attention to every prompt token,
   accumulated over the window and each KV head's query group (the heavy-hitter score of H2O, which
   the paper uses as its importance policy, computed from the window instead of every query).
2. Per KV head, the `budget` most important tokens (the `sink` first and the `window` most recent
   among them) are written as complete high-precision blocks (`high_bits`) into the request's
   first blocks, exactly as an eviction method keeps its tokens.
3. Every other token of the prompt's full blocks is written at `low_bits` into low-precision
   chunks packed behind them (vllm_kvpress/mixed_layout.py): a 2-bit chunk of one KV head is a
   page of the low layout, and about 3.4 of them fit in the bytes an 8-bit head takes, so the
   demoted tokens take 3.4x fewer blocks instead of none.
4. The blocks after those go back to vLLM; the last partial prompt block and the generated tokens
   stay high precision. Decode attends over all three regions (no token is left behind).

Deviations from the paper, and why:

- Keys are quantized per channel (within each 64-token chunk, KIVI's grouping) at both precisions,
  values per token. MiKV quantizes the low-precision tokens per token and adds a channel balancer
  (keys divided, queries multiplied, per channel, by sqrt(max|q| / max|k|)) because per-token scales
  cannot isolate the few key channels with outliers. Per-channel key scales isolate them by
  construction, and for per-channel asymmetric quantization the balancer is an identity (scaling a
  channel scales its scale and zero; the codes do not change), so it is not applied.
- The importance is scored once, from the window queries (SnapKV's observation window), not
  accumulated over every query as H2O does during generation; `decode_interval` (re-scoring during
  decode) is not implemented for mixed-precision pages yet and is refused.
- Each KV head keeps the same number of important tokens (one block table serves the request).
- Decode reads both precisions in the Triton kernel only (the CUDA decode kernel reads one page
  format); the worker's split is eviction/mixed.py.

Parameters (defaults: the fields below; `vllm-kvpress methods mikv`)
----------
budget : int or float
    Important tokens per request and KV head, kept at `high_bits`: a count or a share of the prompt
    in (0, 1) (rounded up to whole blocks; the sink and recent window are part of it).
high_bits : int
    Code width of the important tokens' pages: 8 or 4 (the `bits` of the pages).
low_bits : int
    Code width of every other prompt token: 2 or 4, below `high_bits`.
window, sink, observation_window : as for every eviction method (methods/eviction.py).
pages, group_size, block_size, tail_keys : the quantizer of both precisions (KIVI's, 8-bit V groups
    of the whole head, staged tails, by default).
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.layout import PageLayout
from vllm_kvpress.methods.base import Family, MethodInfo, check_choice
from vllm_kvpress.methods.eviction import TokenEviction
from vllm_kvpress.methods.kivi import Kivi
from vllm_kvpress.mixed_layout import LowPrecisionPacking

if TYPE_CHECKING:  # torch is imported where the rule runs: listing or validating methods stays light
    import torch

    from vllm_kvpress.eviction.scoring import WindowStats

HIGH_BITS_SETTING = "high_bits"
"""The users' name of the pages' `bits`: the important tokens' code width."""
ALLOWED_HIGH_BITS = (4, 8)
ALLOWED_LOW_BITS = (2, 4)
"""Code widths the page codecs and kernels are built for below 8 bits (3 bits is not: codes pack
whole in bytes at 2, 4 and 8)."""


@dataclass(frozen=True)
class MiKV(TokenEviction):
    info: ClassVar[MethodInfo] = MethodInfo(
        "mikv", "No Token Left Behind: importance-aware mixed-precision KV cache (MiKV)", "2402.18096",
        Family.MIXED_PRECISION,
        "important tokens in high-bit pages, every other prompt token packed in low-bit pages; blocks freed",
    )

    budget: int | float = 0.15
    """Important tokens kept at high_bits: 15% of every prompt. With 8-bit important and 2-bit
    demoted pages a long prompt then takes about 0.23 of bf16's bytes (4.3x fewer), less than 4-bit
    KIVI pages of every token (0.28), with its most attended tokens near lossless."""
    low_bits: int = 2
    """Code width of the demoted tokens: 2 bits, where the paper's low-precision set recovers most
    of what eviction loses."""

    # -- settings ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], lookup: Callable[[str], type] | None = None) -> Self:
        """As every evicting method's, with the pages' `bits` named `high_bits`."""
        settings = dict(settings)
        if "bits" in settings:
            raise KVCompressionConfigError(
                f"{cls.info.name}: bits is not a setting of {cls.info.name}; allowed: {HIGH_BITS_SETTING} (the "
                "important tokens' pages) and low_bits (every other token's)"
            )
        if HIGH_BITS_SETTING in settings:
            settings["bits"] = settings.pop(HIGH_BITS_SETTING)
        return super().from_settings(settings, lookup)

    def to_dict(self) -> dict[str, Any]:
        settings = super().to_dict()
        return {(HIGH_BITS_SETTING if name == "bits" else name): value for name, value in settings.items()}

    @property
    def high_bits(self) -> int:
        return self.pages.bits

    def problems(self) -> list[str]:
        problems = super().problems()
        check_choice(HIGH_BITS_SETTING, self.pages.bits, ALLOWED_HIGH_BITS, problems)
        check_choice("low_bits", self.low_bits, ALLOWED_LOW_BITS, problems)
        if (isinstance(self.low_bits, int) and isinstance(self.pages.bits, int)
                and self.low_bits >= self.pages.bits):
            problems.append(
                f"low_bits={self.low_bits} is not below {HIGH_BITS_SETTING}={self.pages.bits}; allowed: "
                "low_bits < high_bits"
            )
        if self.decode_interval:
            problems.append(
                f"decode_interval={self.decode_interval} is not implemented for mixed-precision pages yet; "
                "allowed: 0 (the prompt is split once)"
            )
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        problems = super().problems_for_model(
            head_size=head_size, num_kv_heads=num_kv_heads, max_model_len=max_model_len
        )
        if problems:
            return problems
        packing = self.middle_packing(num_kv_heads, head_size)
        if not packing.saves_blocks:
            high, low = self.page_layout(head_size), self.low_page_layout(head_size)
            problems.append(
                f"low_bits={self.low_bits} chunks ({low.bytes_per_head} bytes per KV head) do not pack "
                f"tighter than {HIGH_BITS_SETTING}={self.pages.bits} pages ({high.bytes_per_head} bytes) on "
                f"{num_kv_heads} KV heads of size {head_size}: {packing.units_per_block} fit in a block of "
                f"{num_kv_heads}; allowed: a lower low_bits or a higher high_bits"
            )
        return problems

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def low_pages(self) -> Kivi:
        """The quantizer of the demoted tokens: the pages' own at `low_bits`."""
        return dataclasses.replace(self.pages, bits=self.low_bits)

    def low_page_layout(self, head_size: int) -> PageLayout:
        return self.low_pages.page_layout(head_size)

    def middle_packing(self, num_kv_heads: int, head_size: int | None = None) -> LowPrecisionPacking:
        """How the demoted tokens' chunks pack behind the important blocks (mixed_layout.py)."""
        if head_size is None:
            raise ValueError("mikv's kept blocks depend on the head size: pass head_size")
        return LowPrecisionPacking.for_layouts(self.page_layout(head_size), self.low_page_layout(head_size),
                                               num_kv_heads)

    def kept_prompt_blocks(self, prompt_len, num_kv_heads: int | None = None, head_size: int | None = None):
        """Leading view blocks kept after compaction: the important K and the low-precision L
        (`eviction/policy.py`); L depends on the KV heads and head size, so both must be given."""
        if num_kv_heads is None or head_size is None:
            raise ValueError("mikv's kept blocks depend on the KV heads and head size: pass both")
        return super().kept_prompt_blocks(prompt_len, num_kv_heads, head_size)

    def score(self, stats: "WindowStats") -> "torch.Tensor":
        """Importance: the window's attention accumulated per KV head (heavy hitters)."""
        return stats.per_kv_head(stats.attention_sum)
