"""Owns the KV-cache spec of compressed pages and the patch that hands it to vLLM.

vLLM sizes its block pool as `available_bytes // sum(page_size_bytes)` over layers, so a spec whose
page is the compressed size is all it takes for vLLM's own memory profiling to hand out
proportionally more blocks. The page bytes come from `layout.py` and nowhere else.
"""

from dataclasses import dataclass, fields, replace
from typing import Self

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvpress.errors import KVCompressionConfigError


@dataclass(frozen=True, kw_only=True)
class KVPressAttentionSpec(FullAttentionSpec):
    """Full attention whose pages hold packed codes (dtype uint8) instead of bf16 K/V.

    Being a `FullAttentionSpec` subclass, it resolves to vLLM's `FullAttentionManager` through the
    spec registry's MRO walk, which is right for methods that quantize without evicting.
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


def compressed_spec_for_layer(spec: FullAttentionSpec, vllm_config) -> KVPressAttentionSpec:
    """The compressed version of the spec vLLM built for one of our attention layers."""
    from vllm_kvpress.backend.state import method_config_from_vllm_config

    method_config = method_config_from_vllm_config(vllm_config)
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise KVCompressionConfigError(
            f"layers with {type(spec).__name__} (sliding window or chunked local attention) are not "
            "supported; allowed: models whose attention layers are all full attention"
        )
    if spec.block_size != method_config.block_size:
        raise KVCompressionConfigError(
            f"vLLM chose block size {spec.block_size} but method '{method_config.method}' was configured "
            f"with block_size={method_config.block_size}; set the same value in --block-size and "
            "--kv-compression-config"
        )
    layout = method_config.page_layout(spec.head_size)
    common = {
        "block_size": spec.block_size,
        "num_kv_heads": spec.num_kv_heads,
        "head_size": spec.head_size,
        "head_size_v": spec.head_size_v,
        "dtype": torch.uint8,
        "bytes_per_head": layout.bytes_per_head,
        "compression_tag": repr(sorted(method_config.to_dict().items())),
    }
    if method_config.evicts_tokens:
        # every layer of the group gets it: vLLM builds a group's manager from one layer's spec
        from vllm_kvpress.eviction.manager import KVPressEvictionSpec, register_eviction_spec

        register_eviction_spec()  # the spec is useless to vLLM without its manager (idempotent)
        packing = method_config.packing(spec.num_kv_heads)
        return KVPressEvictionSpec(**common, budget=method_config.budget,
                                   retrieval_heads=packing.retrieval_heads if packing else 0,
                                   interval_blocks=method_config.interval_blocks)
    return KVPressAttentionSpec(**common)


def patch_attention_kv_cache_spec() -> None:
    """Wrap vLLM 0.26.0 `vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec`
    so that layers served by our backend report compressed pages. Other layers are untouched."""
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention.get_kv_cache_spec, "_kvpress_wrapped", False):
        return
    original = Attention.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or not getattr(self.get_attn_backend(), "is_kvpress_backend", False):
            return spec
        return compressed_spec_for_layer(spec, vllm_config)

    get_kv_cache_spec._kvpress_wrapped = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec
