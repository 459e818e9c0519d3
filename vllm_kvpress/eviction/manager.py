"""Owns the scheduler side of eviction: the KV-cache spec of evicting layers and the block manager
that returns the blocks of evicted prompt tokens to vLLM's free pool.

vLLM picks a block manager per KV-cache group from its spec registry (an MRO walk over registered
spec classes). `KVPressEvictionSpec` is registered with `EvictionBlockManager`, a
`FullAttentionManager` that frees a middle range of blocks once the prompt has been processed,
modelled on vLLM's `RSWAManager`:

    logical blocks  |k0|k1|k2|b3|b4|b5|b6|b7|tail..     freed: [kept, P // block_size)

vLLM calls `remove_skipped_blocks` with the *processed* token count (steps still in flight are
excluded), so the blocks are freed only after the step that compacted them ran; GPU stream order
puts every later writer of those blocks behind it. Freed entries become vLLM's null block in the
request's list, which keeps `get_num_blocks_to_allocate` and `free` right (the pool skips nulls).
"""

from dataclasses import dataclass

from vllm_kvpress.backend.spec import KVPressAttentionSpec
from vllm_kvpress.eviction.policy import kept_prompt_blocks


@dataclass(frozen=True, kw_only=True)
class KVPressEvictionSpec(KVPressAttentionSpec):
    """Compressed pages of a method that evicts prompt tokens (resolves to `EvictionBlockManager`)."""

    budget: int | float = 0
    """The method's `budget` (`EvictionConfig.budget`): kept prompt tokens, or a fraction of the prompt."""


def _manager_class():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    class EvictionBlockManager(FullAttentionManager):
        """Frees blocks [kept, P // block_size) of a request once its prompt (P tokens) is processed."""

        def remove_skipped_blocks(
            self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
        ) -> None:
            if num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
                return  # the compaction step has not run yet
            kept = kept_prompt_blocks(num_prompt_tokens, self.kv_cache_spec.budget, self.block_size)
            # idempotent: the range is freed backwards and stops at the first null block
            self._remove_blocks_in_range(request_id, kept, num_prompt_tokens // self.block_size)

        @classmethod
        def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
            # compacted blocks no longer hold the tokens their hashes name (prefix caching is off
            # for evicting methods; this keeps a request from ever reusing one)
            return tuple([] for _ in kv_cache_group_ids), 0

        def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
            return 0

    return EvictionBlockManager


EvictionBlockManager = None
"""The manager class, built on first registration (vLLM's manager module is heavy to import)."""


def patch_spec_registry() -> None:
    """Register `KVPressEvictionSpec` in every process, lazily and after vLLM's built-in specs.

    vLLM registers its built-in specs only while the registry is empty (`_ensure_registered`, run
    by every lookup); registering ours first would leave plain `FullAttentionSpec` layers without
    a manager. So this wraps `_ensure_registered`: built-ins first, then ours. Idempotent."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    if getattr(KVCacheSpecRegistry._ensure_registered, "_kvpress_wrapped", False):
        return
    original = KVCacheSpecRegistry._ensure_registered.__func__

    def _ensure_registered(cls, vllm_config=None) -> None:
        global EvictionBlockManager
        original(cls, vllm_config)
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST

        if KVPressEvictionSpec not in _REGISTRY_KVCACHESPEC_LIST:
            if EvictionBlockManager is None:
                EvictionBlockManager = _manager_class()
            cls.register(KVPressEvictionSpec, EvictionBlockManager, uniform_type_base_spec=FullAttentionSpec)

    _ensure_registered._kvpress_wrapped = True  # type: ignore[attr-defined]
    KVCacheSpecRegistry._ensure_registered = classmethod(_ensure_registered)
