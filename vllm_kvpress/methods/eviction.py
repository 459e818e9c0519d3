"""Owns the settings every token-eviction method shares: the budget, the always-kept sink and
recent window, the observation windows that score, the decode-time schedule, and the quantized
pages the kept tokens live in.

Eviction runs on the forward that completes a request's prompt (and, with `decode_interval`, again
every `decode_interval` generated tokens, over the kept tokens and those since): the last
`observation_window` prompt queries score every prompt token (per KV head), the method keeps
`budget` tokens (the `sink` first and `window` most recent among them), the worker compacts them
into the request's first blocks and the block manager returns the rest to vLLM's free pool
(`vllm_kvpress/eviction/`). The kept tokens are stored in quantized pages, so eviction composes with
quantization: by default KIVI-style 8-bit pages (near lossless), whose settings (`bits`,
`group_size`, `block_size`) are given beside the method's own; `pages` names another quantizer, e.g.
`{"pages": "gear", "bits": 4}` keeps the chosen tokens in GEAR 4-bit pages (3.4x fewer bytes than
bf16 per kept token).

A method adds its one idea to `TokenEviction`: a `score` of every prompt token per KV head from
the window statistics (snapkv, scissorhands), or a whole `choose` rule (kvcrush). `EvictingMethod`
is the wider base of methods that keep a different set per head (razor's head-wise packing).

Parameters (defaults: the fields of `TokenEviction` below, and of each method)
----------
budget : int or float
    Prompt tokens kept per request and KV head: an integer count (at least one block), or a
    fraction of the prompt in (0, 1). Rounded up to whole blocks.
window : int
    Most recent prompt tokens always kept (part of the budget).
sink : int
    First prompt tokens always kept (attention sinks; part of the budget).
observation_window : int
    Last prompt queries whose attention scores the tokens (SnapKV's observation window).
decode_interval : int
    Decode-time eviction: every `decode_interval` tokens after the prompt's last full block (a
    multiple of block_size), the kept tokens and those since are scored again and `budget` of them
    kept, so a request's KV stays bounded however long it generates; 0 evicts once, after the
    prompt. Scores come from the last `decode_observation_window` queries, which each attention
    layer keeps for every running request (max_num_seqs x that many x num_heads x head_size
    elements of the model dtype per layer).
decode_observation_window : int
    Recent queries that score a decode-time eviction (at most decode_interval).
pages : str
    The quantizer whose pages hold the kept tokens: "kivi" (the default) or "gear"; its settings
    (bits, group_size, block_size, tail_keys; rank, outliers, power_iters for gear) are given flat
    beside these. Whatever the quantizer, bits, group_size, block_size and tail_keys default to
    `EVICTION_PAGES`'s.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.eviction.policy import HeadPacking, kept_prompt_blocks
from vllm_kvpress.methods.base import CompressionMethod, check_range, setting_names
from vllm_kvpress.methods.kivi import Kivi

if TYPE_CHECKING:  # torch is imported where a rule runs: listing or validating methods stays light
    import torch

    from vllm_kvpress.eviction.policy import Packing
    from vllm_kvpress.eviction.scoring import WindowStats
    from vllm_kvpress.layout import PageLayout

MAX_OBSERVATION_WINDOW = 512
EVICTION_PAGES = Kivi(bits=8, group_size="head", tail_keys="staged")
"""The pages evicting methods keep their tokens in by default. 8 bits: near lossless on SmolLM2
(kivi 8-bit: dNLL -0.002, docs/eval.md), so the quality cost is eviction's alone; with group_size
head they take 1.91x fewer bytes per kept token than bf16 (head_dim 128), bits 4 takes 3.66x fewer.
tail_keys staged: a partial block's K stays in its page, as compaction moves a request's blocks and
the exact tail beside the pages has not been taught to follow them."""
PAGE_SETTING = "pages"


@dataclass(frozen=True)
class EvictingMethod(CompressionMethod):
    """Base of the methods that free the blocks of the tokens they drop: the quantized `pages` the
    kept tokens live in (flat settings beside the method's own), the budget schedule the block
    manager, the metadata builder and the worker agree on (eviction/policy.py), and the head policy.

    Subclasses give `budget` (prompt tokens every KV head keeps: a count, or a fraction of the prompt
    as a float; eviction/policy.py `Budget`) and `sink` (first tokens always kept), as settings or
    properties, and may override the hooks below."""

    pages: Kivi = field(default=EVICTION_PAGES)
    """The quantizer holding the kept tokens (see the module docstring)."""

    # -- settings ------------------------------------------------------------------------------
    @classmethod
    def own_setting_names(cls) -> list[str]:
        return [name for name in setting_names(cls) if name != PAGE_SETTING]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], lookup: Callable[[str], type] | None = None) -> Self:
        """Settings of the method and of its pages, flat; `pages` names the quantizer, found
        through `lookup` (the method registry), by default the one of `EVICTION_PAGES`."""
        settings = dict(settings)
        default_pages = cls.__dataclass_fields__[PAGE_SETTING].default
        page_name = settings.pop(PAGE_SETTING, default_pages.method)
        page_cls = type(default_pages) if page_name == default_pages.method else cls._quantizer(page_name, lookup)
        own, page_fields = cls.own_setting_names(), setting_names(page_cls)
        unknown = sorted(set(settings) - set(own) - set(page_fields))
        if unknown:
            raise KVCompressionConfigError(
                f"unknown setting(s) {', '.join(unknown)} for method '{cls.info.name}'; allowed: "
                f"{', '.join([*page_fields, *own])} (the first {len(page_fields)} of its {page_name} pages), and "
                f"{PAGE_SETTING}, the quantizer of its pages"
            )
        page_values = {name: value for name, value in dataclasses.asdict(default_pages).items() if name in page_fields}
        page_values |= {name: value for name, value in settings.items() if name in page_fields}
        own_values = {name: value for name, value in settings.items() if name in own}
        return cls(pages=page_cls(**page_values), **own_values).validated()

    @classmethod
    def _quantizer(cls, name: Any, lookup: Callable[[str], type] | None) -> type[Kivi]:
        try:
            found = lookup(name) if lookup is not None and isinstance(name, str) else None
        except (KVCompressionConfigError, MethodNotImplementedError):
            found = None  # an unknown or planned name: refused below as a `pages` value, not as a method
        if not (isinstance(found, type) and issubclass(found, Kivi)):
            raise KVCompressionConfigError(
                f"{cls.info.name}: {PAGE_SETTING}={name!r} is not allowed; allowed: the name of a quantizer "
                "whose pages hold the kept tokens, e.g. 'kivi' or 'gear'"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        own = {name: getattr(self, name) for name in self.own_setting_names()}
        pages = self.pages.to_dict()
        return {"method": self.method, PAGE_SETTING: pages.pop("method"), **pages, **own}

    def problems(self) -> list[str]:
        problems = self.pages.problems()
        if self.pages.tail_keys != "staged":
            # compaction moves a request's blocks; the exact tail has not been taught to follow them
            problems.append(
                f"tail_keys='{self.pages.tail_keys}' is not implemented for method '{self.method}' (it evicts "
                "tokens) yet; allowed: 'staged'"
            )
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        return self.pages.problems_for_model(head_size=head_size, num_kv_heads=num_kv_heads,
                                             max_model_len=max_model_len)

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def eviction(self) -> Self:
        return self

    @property
    def interval_blocks(self) -> int:
        """Decode-time eviction every this many blocks (`eviction/policy.py` `freed_end`); 0: none."""
        return 0

    def packing(self, num_kv_heads: int) -> HeadPacking | None:
        """Head policy: None where every KV head keeps the same number of tokens; else how many KV
        heads of every layer keep every prompt token (head-wise packed pages, methods/razor.py)."""
        return None

    def packed_heads(self, model_config: dict, num_kv_heads: int) -> list[list[int]]:
        """With `packing`: per layer, the KV heads that keep every prompt token (ascending).

        Args:
            model_config: the served model's config.json as a dict.
        """
        raise NotImplementedError(f"method '{self.method}' packs no heads")

    def low_page_layout(self, head_size: int) -> "PageLayout | None":
        """Precision policy: None where every kept token stays in the pages' precision; else the
        layout of the low-precision chunks the other prompt tokens are demoted to (methods/mikv.py)."""
        return None

    def middle_packing(self, num_kv_heads: int, head_size: int | None = None) -> "Packing | None":
        """The schedule's packing (`eviction/policy.py` `Packing`): what the blocks after the
        every-head ones hold. The head policy's `packing` here; a method that keeps its other
        tokens in another page form gives its own (methods/mikv.py: low-precision chunks, whose
        count per block depends on the head size)."""
        return self.packing(num_kv_heads)

    @property
    def retrieves_sentences(self) -> bool:
        """Retrieval policy: whether each decode step attends only to the sentences its query
        retrieves (`sentence_budget` tokens per KV head: methods/sentencekv.py) rather than to every
        kept token."""
        return False

    def sentence_budget(self, prompt_len: int) -> int:
        """Where `retrieves_sentences`: the stored tokens per KV head a decode step attends to."""
        raise NotImplementedError(f"method '{self.method}' retrieves no sentences")

    def sparse_prefill(self, prompt_len: int) -> bool:
        """Whether a prompt of `prompt_len` tokens prefills over part of its context only
        (`prefill_context`); dense prefill by default."""
        return False

    def prefill_context(self, queries: "torch.Tensor", keys: "torch.Tensor", values: "torch.Tensor",
                        context_len: int, scale: float) -> tuple["torch.Tensor", "torch.Tensor", int]:
        """Where `sparse_prefill`: the context a prefill chunk attends to, K, V [count, num_kv_heads,
        head_size] and `count`, from the chunk's queries [T, num_heads, head_size] and `keys`,
        `values` [context_len + T, num_kv_heads, head_size] (the context, then the chunk)."""
        raise NotImplementedError(f"method '{self.method}' has no sparse prefill")

    def kept_prompt_blocks(self, prompt_len, num_kv_heads: int | None = None, head_size: int | None = None):
        """Leading prompt blocks kept after compaction (`eviction/policy.py`); `num_kv_heads` (and
        for some methods `head_size`) is needed where the blocks after the every-head ones are packed."""
        packing = None if num_kv_heads is None else self.middle_packing(num_kv_heads, head_size)
        return kept_prompt_blocks(prompt_len, self.budget, self.block_size, packing)


@dataclass(frozen=True)
class TokenEviction(EvictingMethod):
    """Base of the methods that keep `budget` tokens of every prompt chosen from the window
    queries' attention (eviction/scoring.py): `select_kept_tokens` forces the sink and the recent
    window, then asks `choose` for the rest."""

    counts_pivotal: ClassVar[bool] = False
    """Whether the scorer reads `WindowStats.pivotal_count` (computed only where asked)."""

    budget: int | float = 2048
    """Kept prompt tokens per request and KV head (int), or a fraction of the prompt (float).
    2048 is SnapKV's own LongBench setting, at which it stays within about 1 point of the full cache;
    a fixed count bounds every request's KV memory (prompts up to 2048 tokens are not evicted at all,
    longer ones keep 2048 + their last partial block). A fraction such as 0.25 keeps a constant ratio."""
    window: int = 64
    """Most recent prompt tokens always kept: one block (the question usually sits at the end)."""
    sink: int = 4
    """First prompt tokens always kept: StreamingLLM's four attention-sink tokens."""
    observation_window: int = 32
    """Last prompt queries that score the tokens (SnapKV's published window)."""
    decode_interval: int = 0
    """Tokens between decode-time evictions (a multiple of block_size); 0: evict after the prompt only
    (decode-time eviction trades quality for memory, so it is asked for, e.g. 512)."""
    decode_observation_window: int = 16
    """Recent queries that score a decode-time eviction."""

    def problems(self) -> list[str]:
        problems = super().problems()
        block_size = self.pages.block_size
        if isinstance(self.budget, float):
            if not 0.0 < self.budget < 1.0:
                problems.append(
                    f"budget={self.budget!r} is not allowed; allowed: a fraction of the prompt in (0, 1) "
                    "or a token count (integer)"
                )
        elif isinstance(self.budget, int) and not isinstance(self.budget, bool):
            if isinstance(block_size, int) and self.budget < block_size:
                problems.append(
                    f"budget={self.budget} is not allowed; allowed: at least one block "
                    f"(block_size={block_size}) of tokens, or a fraction in (0, 1)"
                )
        else:
            problems.append(f"budget={self.budget!r} is not allowed; allowed: a token count or a fraction in (0, 1)")
        check_range("window", self.window, 0, 1 << 20, problems)
        check_range("sink", self.sink, 0, 1 << 20, problems)
        check_range("observation_window", self.observation_window, 1, MAX_OBSERVATION_WINDOW, problems)
        check_range("decode_observation_window", self.decode_observation_window, 1, MAX_OBSERVATION_WINDOW,
                    problems)
        check_range("decode_interval", self.decode_interval, 0, 1 << 20, problems)
        # a block size that is not positive is the pages' problem (reported by them), not a divisor here
        if (isinstance(self.decode_interval, int) and isinstance(block_size, int) and block_size > 0
                and self.decode_interval):
            if self.decode_interval % block_size:
                problems.append(
                    f"decode_interval={self.decode_interval} is not allowed; allowed: 0 (evict after the "
                    f"prompt only) or a multiple of block_size={block_size}"
                )
            window = self.decode_observation_window
            if isinstance(window, int) and window > self.decode_interval:
                problems.append(
                    f"decode_observation_window={self.decode_observation_window} exceeds decode_interval="
                    f"{self.decode_interval}; allowed: at most decode_interval (the scoring queries come "
                    "from the tokens since the last eviction)"
                )
        budget_valid = (isinstance(self.budget, int) and not isinstance(self.budget, bool)
                        and not (isinstance(block_size, int) and self.budget < block_size))
        if (
            budget_valid  # an invalid budget is reported once, above
            and isinstance(self.window, int) and isinstance(self.sink, int)
            and self.window + self.sink > self.budget
        ):
            problems.append(
                f"window={self.window} + sink={self.sink} exceed budget={self.budget}; "
                "allowed: window + sink <= budget"
            )
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        problems = super().problems_for_model(
            head_size=head_size, num_kv_heads=num_kv_heads, max_model_len=max_model_len
        )
        if isinstance(self.budget, int) and self.budget > max_model_len:
            problems.append(
                f"budget={self.budget} is larger than the model's max_model_len={max_model_len}, so nothing "
                f"would ever be evicted; allowed: a token count up to {max_model_len}, or a fraction in (0, 1)"
            )
        return problems

    @property
    def interval_blocks(self) -> int:
        return self.decode_interval // self.pages.block_size

    # -- the scorer ----------------------------------------------------------------------------
    def score(self, stats: "WindowStats") -> "torch.Tensor":
        """Importance of every candidate token per KV head, fp32 [num_kv_heads, >= num_candidates]:
        the `choose` of the base keeps the highest. A method overrides this or `choose`."""
        raise NotImplementedError(f"method '{self.method}' defines neither score nor choose")

    def choose(self, stats: "WindowStats", free: "torch.Tensor", num_free: int) -> "torch.Tensor":
        """The tokens kept besides the forced sink and recent window.

        Args:
            stats: the window queries' attention over the prompt (eviction/scoring.py).
            free: bool [num_candidates], the candidates not forced already.
            num_free: how many of them to keep, at least 1.
        Returns:
            int64 [num_kv_heads, num_free] (or [1, num_free] for one choice every head shares):
            distinct positions where `free` is True.
        """
        return highest_free(self.score(stats), free, num_free)


def highest_free(scores: "torch.Tensor", free: "torch.Tensor", num_free: int) -> "torch.Tensor":
    """The `num_free` highest-scored candidates where `free` is True, per row of `scores`
    [rows, >= num_candidates]: int64 [rows, num_free] (`TokenEviction.choose`'s rule)."""
    return scores[:, : free.numel()].masked_fill(~free, float("-inf")).topk(num_free, dim=1).indices
