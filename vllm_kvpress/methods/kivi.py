"""KIVI-style quantized pages: the configuration of plain asymmetric K/V quantization.

Based on KIVI (https://arxiv.org/abs/2402.02750).

1. Keys are quantized per channel: each channel of a block of `block_size` tokens gets an fp16
   scale and zero, because key outliers live in fixed channels (KIVI section 3).
2. Values are quantized per token, in groups of `group_size` channels.
3. Codes are `bits`-bit asymmetric integers: q = round((x - min) / scale), scale = (max - min) / (2^bits - 1).

Deviation from the paper: KIVI keeps the most recent tokens in full precision until a group fills.
Here keys follow it (`tail_keys: exact`, what `auto`, the default, picks on vLLM's V2 model runner):
each request's partial block keeps its K in the model dtype outside the pages (under the request's
state slot), and the block is quantized per channel from those exact values when it completes.
Values are always staged: a partial block's V is quantized per token in its page, which is V's
final grouping anyway. `tail_keys: staged` stages K per token in the page too and re-quantizes it
per channel when the block completes (no extra memory, any model runner); models whose keys have a
few channels of very large magnitude (Qwen2.5) lose their accuracy with it: a per-token scale spans
those channels and rounds every other channel of the token to zero (docs/quantized_pages.md).
Prompt blocks, the ones that matter for long contexts, are quantized per channel directly from the
exact bf16 values either way.

Parameters (defaults: the fields of `Kivi` below; configs/kivi.yaml writes them out)
----------
bits : int
    Code width of K and V, one of 2, 4, 8.
group_size : int or "head"
    Channels per V quantization group; "head" means the whole head.
block_size : int
    Tokens per vLLM block; also the token group of per-channel K scales.
tail_keys : str
    "exact" (the partial block's K kept in the model dtype beside the pages: max_num_seqs x
    num_kv_heads x block_size x head_size elements per layer; needs vLLM's V2 model runner),
    "staged" (per-token K codes in the partial block's page), or "auto": exact where vLLM runs the
    V2 model runner, else staged with a warning (`for_engine`).
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.layout import PageLayout
from vllm_kvpress.methods.base import CompressionMethod, Family, MethodInfo, check_choice

ALLOWED_BITS = (2, 4, 8)
ALLOWED_GROUP_SIZES = ("head", 16, 32, 64, 128)
ALLOWED_BLOCK_SIZES = (16, 32, 64, 128)
ALLOWED_TAIL_KEYS = ("auto", "exact", "staged")


@dataclass(frozen=True)
class Kivi(CompressionMethod):
    """KIVI-style pages, and the base of every quantizer: a method whose `pages` is itself. An
    evicting method keeps its tokens in one of these (methods/eviction.py, `pages`)."""

    info: ClassVar[MethodInfo] = MethodInfo(
        "kivi", "KIVI: tuning-free asymmetric 2-bit KV-cache quantization", "2402.02750", Family.QUANTIZATION,
        "K per-channel, V per-token asymmetric 2/4/8-bit groups in packed paged blocks",
    )
    bits: int = 4
    """Code width of K and V. 4 bits at head_dim 128: 144 bytes per token and head, 3.56x the bf16
    capacity (docs/quantized_pages.md)."""
    group_size: int | str = 64
    """Channels per V quantization group, or "head" for the whole head."""
    block_size: int = 64
    """Tokens per vLLM block and per-channel K group."""
    tail_keys: str = "auto"
    """Where a partial block's K lives: "exact" beside the pages, "staged" in its page, or "auto":
    exact on vLLM's V2 model runner (KIVI's full-precision residual, which models with a few huge key
    channels need: Qwen2.5, docs/quantized_pages.md), else staged (no extra memory)."""

    def problems(self) -> list[str]:
        problems: list[str] = []
        check_choice("bits", self.bits, ALLOWED_BITS, problems)
        check_choice("group_size", self.group_size, ALLOWED_GROUP_SIZES, problems)
        check_choice("block_size", self.block_size, ALLOWED_BLOCK_SIZES, problems)
        check_choice("tail_keys", self.tail_keys, ALLOWED_TAIL_KEYS, problems)
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        problems = super().problems_for_model(
            head_size=head_size, num_kv_heads=num_kv_heads, max_model_len=max_model_len
        )
        if isinstance(self.group_size, int) and head_size % self.group_size:
            problems.append(
                f"group_size={self.group_size} does not divide the model's head size {head_size}; "
                f"allowed: a divisor of {head_size} from {', '.join(map(str, ALLOWED_GROUP_SIZES[1:]))}, or 'head'"
            )
        return problems

    @property
    def pages(self) -> "Kivi":
        return self

    @property
    def power_iters(self) -> int:
        """Power-iteration steps of the block encode's low-rank term: KIVI pages have none to fit
        (GEAR's pages make it a setting, which replaces this)."""
        return 1

    def v_group_size(self, head_size: int) -> int:
        return head_size if self.group_size == "head" else int(self.group_size)

    def page_layout(self, head_size: int) -> PageLayout:
        return PageLayout(
            head_size=head_size,
            block_size=self.block_size,
            k_bits=self.bits,
            v_bits=self.bits,
            v_group_size=self.v_group_size(head_size),
            exact_tail_keys=self.exact_tail_keys,
        )

    @property
    def exact_tail_keys(self) -> bool:
        """Whether the pages' layout keeps partial blocks' keys exact. "auto" is made concrete where
        the engine is known (`for_engine`: at vLLM engine creation, and in the reference engine); a
        layout made before that, as the kernel benchmarks make theirs, stages them."""
        return self.tail_keys == "exact"

    def for_engine(self, *, exact_tails_available: bool) -> "Kivi":
        """This config with "auto" made concrete: exact where the model runner can keep exact tails
        (vLLM's V2 runner hands each row's request-state slot), else staged."""
        if self.tail_keys != "auto":
            return self
        return dataclasses.replace(self, tail_keys="exact" if exact_tails_available else "staged")
