"""Owns the KV-cache specs of compressed pages: plain, and of methods that evict tokens (which vLLM
maps to our block manager, backend/block_manager.py). vllm_kvpress/vllm_patches.py hands them to vLLM.

vLLM sizes its block pool as `available_bytes // sum(page_size_bytes)` over layers, so a spec whose
page is the compressed size is all it takes for vLLM's own memory profiling to hand out
proportionally more blocks. The page bytes come from `layout.py` and nowhere else.
"""

from dataclasses import dataclass, fields, replace
from typing import Self

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvpress.backend import state
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.eviction.policy import Budget, HeadPacking
from vllm_kvpress.mixed_layout import LowPrecisionPacking


@dataclass(frozen=True, kw_only=True)
class KVPressAttentionSpec(FullAttentionSpec):
    """Full attention whose pages hold packed codes (dtype uint8) instead of bf16 K/V.

    Being a `FullAttentionSpec` subclass, it resolves to vLLM's `FullAttentionManager` through the
    spec registry's MRO walk, which is right for methods that quantize without evicting. Layers are
    ours when their backend says so (`KVPressBackend.is_kvpress_backend`).
    """

    bytes_per_head: int = 0
    """Bytes of one KV head of one block (`PageLayout.bytes_per_head`)."""
    compression_tag: str = ""
    """Method and its settings; part of equality so differently compressed layers never merge."""

    @property
    def real_page_size_bytes(self) -> int:
        return self.num_kv_heads * self.bytes_per_head

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        # vLLM's merge rebuilds the spec from FullAttentionSpec's fields; ours (and a subclass's,
        # such as the eviction budget) must agree across the group and carry over
        ours = {f.name for f in fields(cls)} - {f.name for f in fields(FullAttentionSpec)}
        first = {name: getattr(specs[0], name) for name in ours}
        for spec in specs:
            if {name: getattr(spec, name) for name in ours} != first:
                # AssertionError, as vLLM's own merges raise: `is_kv_cache_spec_uniform` takes it
                # to mean "not one spec" and groups the layers by type instead of failing
                raise AssertionError("all layers of one KV-cache group must share one page layout")
        return replace(merged, **first)


@dataclass(frozen=True, kw_only=True)
class KVPressEvictionSpec(KVPressAttentionSpec):
    """Compressed pages of a method that evicts prompt tokens (resolves to `EvictionBlockManager`)."""

    budget: Budget = 0
    """The method's `budget` (`EvictingMethod.budget`, methods/eviction.py): kept prompt tokens (int), or a fraction of
    the prompt (float). The default exists only because vLLM's `FullAttentionSpec.merge` builds the
    merged spec from its own fields before `KVPressAttentionSpec.merge` copies ours over; a manager
    refuses it."""
    middle_packing: HeadPacking | LowPrecisionPacking | None = None
    """What the blocks after the every-head ones hold (`EvictingMethod.middle_packing`): razor's
    retrieval-head chunks (vllm_kvpress/headwise_layout.py), MiKV's low-precision units
    (vllm_kvpress/mixed_layout.py), or None for the other methods."""
    interval_blocks: int = 0
    """Decode-time eviction every this many blocks (`EvictingMethod.interval_blocks`); 0: after
    the prompt only."""

    @property
    def packing(self) -> HeadPacking | LowPrecisionPacking | None:
        """The schedule's packing (`eviction/policy.py` `Packing`)."""
        return self.middle_packing



def compressed_spec_for_layer(spec: FullAttentionSpec, vllm_config) -> KVPressAttentionSpec:
    """The compressed version of the spec vLLM built for one of our attention layers: the page
    layout of the method `vllm_config` carries and, for an evicting method, the budget schedule
    the block manager follows."""
    method = state.method_from_vllm_config(vllm_config)
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise KVCompressionConfigError(
            f"layers with {type(spec).__name__} (sliding window or chunked local attention) are not "
            "supported; allowed: models whose attention layers are all full attention"
        )
    if spec.block_size != method.block_size:
        raise KVCompressionConfigError(
            f"vLLM chose block size {spec.block_size} but method '{method.method}' was configured "
            f"with block_size={method.block_size}; set the same value in --block-size and "
            "--kv-compression-config"
        )
    layout = method.page_layout(spec.head_size)
    common = {
        "block_size": spec.block_size,
        "num_kv_heads": spec.num_kv_heads,
        "head_size": spec.head_size,
        "head_size_v": spec.head_size_v,
        "dtype": torch.uint8,
        "bytes_per_head": layout.bytes_per_head,
        "compression_tag": repr(sorted(method.to_dict().items())),
    }
    eviction = method.eviction
    if eviction is not None:
        # every layer of the group gets it: vLLM builds a group's manager from one layer's spec
        return KVPressEvictionSpec(**common, budget=eviction.budget,
                                   middle_packing=eviction.middle_packing(spec.num_kv_heads, spec.head_size),
                                   interval_blocks=eviction.interval_blocks)
    return KVPressAttentionSpec(**common)
