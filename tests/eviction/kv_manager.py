"""A real vLLM 0.26.0 KVCacheManager (coordinator + BlockPool) over one group of our eviction spec."""

import torch
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

from vllm_kvpress.backend.spec import KVPressEvictionSpec
from vllm_kvpress.vllm_patches import register_eviction_block_manager


def eviction_spec(budget, block_size: int, bytes_per_head: int = 100, interval_blocks: int = 0) -> KVPressEvictionSpec:
    return KVPressEvictionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                               bytes_per_head=bytes_per_head, compression_tag="test", budget=budget,
                               interval_blocks=interval_blocks)


def eviction_kv_manager(budget, block_size: int, num_blocks: int, max_model_len: int,
                        enable_caching: bool = False, interval_blocks: int = 0) -> KVCacheManager:
    register_eviction_block_manager()
    spec = eviction_spec(budget, block_size, interval_blocks=interval_blocks)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0", "layer.1"], spec)])
    return KVCacheManager(config, max_model_len=max_model_len, scheduler_block_size=block_size,
                          hash_block_size=block_size, enable_caching=enable_caching)


def request_blocks(manager: KVCacheManager, request_id: str) -> list:
    """The request's block list in the manager (vLLM's null block on freed entries)."""
    return manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id, [])
