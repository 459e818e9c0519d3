"""Owns the scheduler side of eviction: the block manager that returns the blocks of evicted prompt
tokens to vLLM's free pool.

vLLM picks a block manager per KV-cache group from its spec registry (an MRO walk over registered
spec classes); `KVPressEvictionSpec` (backend/spec.py) is registered with `EvictionBlockManager`
(vllm_kvpress/vllm_patches.py), a `FullAttentionManager` that frees a middle range of blocks once the
prompt has been processed, modelled on vLLM 0.26.0's `RSWAManager`:

    logical blocks  |k0|k1|k2|b3|b4|b5|b6|b7|tail..     freed: [kept, P // block_size)

When the blocks are freed (vLLM 0.26.0 `KVCacheManager.allocate_slots`): at the first
`allocate_slots` of the request whose *processed* computed tokens (`num_computed_tokens -
num_in_flight_tokens`, so steps still in flight are excluded) reach P. That is the schedule after
the output of the compacting step was processed: the next step with synchronous scheduling, the
one after with async scheduling. The freed blocks go to the head of the free queue (they carry no
hash), so another request may be handed them, and write them, in that very step; GPU stream order
puts those writes after the compaction. A request that finishes without being scheduled again is
freed whole by `free`.

Freed entries become vLLM's null block in the request's list, so the list keeps one entry per
logical block: `get_num_blocks_to_allocate` and `allocate_new_blocks` count entries (nulls
included) and stay right, and `free` / `BlockPool.free_blocks` skip nulls, so nothing is freed
twice. Preemption frees everything; the re-prefill starts from 0 tokens and is compacted again.
"""

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvpress.backend.spec import KVPressEvictionSpec
from vllm_kvpress.eviction.policy import freed_end, kept_blocks


class EvictionBlockManager(FullAttentionManager):
    """Frees blocks [kept, P // block_size) of a request once its prompt (P tokens) is processed,
    and with decode-time eviction blocks [kept, P // block_size + m T) once (P // block_size + m T)
    blocks are processed (`policy.freed_end`).

    Compacted blocks no longer hold the tokens their hashes name, so nothing is cached or reused:
    no prefix-cache hits, no common prefix (cascade attention), no block hashing.
    """

    def __init__(self, kv_cache_spec: KVPressEvictionSpec, **kwargs) -> None:
        budget = kv_cache_spec.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"{type(kv_cache_spec).__name__} needs a positive budget, got {budget!r}")
        super().__init__(kv_cache_spec, **kwargs)

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        # vLLM 0.26.0 passes num_prompt_tokens from allocate_slots and from the KV-connector finish
        # path; without it the compaction point is unknown, and a full-attention request frees nothing
        if num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
            return  # the compacting step has not run (or is still in flight)
        spec = self.kv_cache_spec
        args = (num_prompt_tokens, spec.budget, self.block_size, spec.packing, spec.interval_blocks)
        end = freed_end(num_prompt_tokens, processed_computed_tokens, *args[1:])
        kept = kept_blocks(*args)
        if end > kept:  # else the budget keeps everything so far: the worker compacted nothing
            # idempotent and O(1) on later calls: vLLM frees the range backwards and stops at the
            # first null block, which is block end - 1 once the range is freed; a decode round's
            # range [kept, end) stops at the previous round's end
            self._remove_blocks_in_range(request_id, kept, end)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens: int, retention_interval: int | None = None) -> None:
        # prefix caching is switched off for evicting methods (engine_args); should it be on anyway,
        # a compacted block must never enter the prefix cache under its original tokens' hash
        return None

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0
