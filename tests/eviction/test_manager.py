"""The scheduler side of eviction with vLLM 0.26.0's real KVCacheManager and BlockPool (CPU):
blocks of evicted prompt tokens return to the pool exactly once, nothing leaks, preemption
(free + re-prefill) works, and vLLM builds our manager for a group of our specs."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from vllm_kvpress.eviction.manager import KVPressEvictionSpec, patch_spec_registry
from vllm_kvpress.eviction.policy import kept_prompt_blocks

BS, NUM_BLOCKS, MAX_LEN = 16, 400, 2048


def _manager(budget) -> KVCacheManager:
    patch_spec_registry()
    spec = KVPressEvictionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                               bytes_per_head=100, compression_tag="test", budget=budget)
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0", "layer.1"], spec)])
    return KVCacheManager(config, max_model_len=MAX_LEN, scheduler_block_size=BS, hash_block_size=BS,
                          enable_caching=False)


def _request(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=64), None)


def _step(manager: KVCacheManager, request: Request, num_tokens: int) -> None:
    """Schedule `num_tokens` of the request and mark them computed (a step that ran)."""
    assert manager.allocate_slots(request, num_tokens) is not None
    request.num_computed_tokens += num_tokens


def _held(manager: KVCacheManager, request: Request) -> int:
    blocks = manager.coordinator.single_type_managers[0].req_to_blocks[request.request_id]
    return sum(not b.is_null for b in blocks)


def test_manager_class_comes_from_the_registry():
    manager = _manager(64)
    assert type(manager.coordinator.single_type_managers[0]).__name__ == "EvictionBlockManager"


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(1, 700), st.integers(1, 300), st.integers(0, 12), st.booleans()),
        min_size=1, max_size=4,
    ),
    budget=st.one_of(st.integers(BS, 512), st.floats(0.05, 0.95)),
)
def test_evicted_blocks_return_once_and_nothing_leaks(requests, budget):
    manager = _manager(budget)
    pool = manager.block_pool
    total_free = pool.get_num_free_blocks()
    live = []
    for i, (prompt_len, chunk, decodes, preempt) in enumerate(requests):
        request = _request(f"r{i}", prompt_len)
        for attempt in range(2 if preempt else 1):
            while request.num_computed_tokens < prompt_len:
                _step(manager, request, min(chunk, prompt_len - request.num_computed_tokens))
            before_decode = _held(manager, request)
            assert before_decode == -(-prompt_len // BS)  # the whole prompt until the next schedule
            for _ in range(decodes):
                _step(manager, request, 1)
            kept = kept_prompt_blocks(prompt_len, budget, BS)
            expected = -(-(prompt_len + decodes) // BS) - (prompt_len // BS - kept)
            if decodes:  # the first schedule after the prompt freed the evicted blocks
                assert _held(manager, request) == expected
            if preempt and attempt == 0:  # recompute preemption: everything back, prefill again
                manager.free(request)
                request.num_computed_tokens = 0
        live.append(request)
        held = sum(_held(manager, r) for r in live)
        assert pool.get_num_free_blocks() == total_free - held  # no block lost or counted twice
    for request in live:
        manager.free(request)
    assert pool.get_num_free_blocks() == total_free
    # every block is free exactly once: the free queue holds no duplicates
    free_ids = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert len(free_ids) == len(set(free_ids)) == total_free


def test_nothing_is_freed_before_the_prompt_is_processed():
    manager = _manager(64)
    request = _request("r", 300)
    _step(manager, request, 200)
    _step(manager, request, 50)
    assert _held(manager, request) == 16  # 250 tokens: no block freed mid-prompt
    _step(manager, request, 50)  # completes the prompt (300 = 18 blocks + 12)
    _step(manager, request, 1)  # the next schedule frees blocks [4, 18)
    assert _held(manager, request) == 4 + 1
    blocks = manager.coordinator.single_type_managers[0].req_to_blocks["r"]
    assert [b.is_null for b in blocks] == [False] * 4 + [True] * 14 + [False]


def test_group_merge_keeps_the_budget_and_refuses_mixed_ones():
    import pytest

    def spec(budget):
        return KVPressEvictionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                                   bytes_per_head=100, compression_tag="t", budget=budget)

    merged = KVPressEvictionSpec.merge([spec(0.25), spec(0.25)])
    assert type(merged) is KVPressEvictionSpec and merged.budget == 0.25 and merged.bytes_per_head == 100
    with pytest.raises(ValueError, match="share one page layout"):
        KVPressEvictionSpec.merge([spec(0.25), spec(512)])


def test_evicting_config_gets_the_eviction_spec(engine_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvpress.backend.spec import compressed_spec_for_layer

    settings = {"method": "snapkv", "budget": 0.125, "block_size": 16}
    vllm_config = engine_config(block_size=16, additional_config={"kv_compression": settings})
    base = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    spec = compressed_spec_for_layer(base, vllm_config)
    assert type(spec) is KVPressEvictionSpec and spec.budget == 0.125
    kivi = engine_config(block_size=64, additional_config={"kv_compression": {"method": "kivi"}})
    assert type(compressed_spec_for_layer(
        FullAttentionSpec(block_size=64, num_kv_heads=2, head_size=64, dtype=torch.bfloat16), kivi)) is not KVPressEvictionSpec
