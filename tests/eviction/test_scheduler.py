"""Eviction under vLLM 0.26.0's real Scheduler and AsyncScheduler (CPU, fake model outputs): when
exactly the evicted blocks return relative to the step that completes (and compacts) the prompt,
which is what the worker may rely on, and that the pool is whole again when the requests finish."""

import pytest
from vllm import SamplingParams
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from vllm_kvpress.eviction.policy import kept_prompt_blocks
from vllm_kvpress.vllm_patches import register_eviction_block_manager

from .kv_manager import eviction_spec, request_blocks

BS, NUM_BLOCKS, BUDGET = 16, 100, 64
PROMPTS = {"a": 300, "b": 170}  # 18 and 10 full blocks; 4 kept each


@pytest.mark.parametrize("scheduler_cls,lag", [(Scheduler, 1), (AsyncScheduler, 2)])
def test_blocks_return_after_the_compacting_step_was_processed(engine_config, scheduler_cls, lag):
    """Synchronous: the next schedule frees them; async (one step in flight): the one after."""
    vllm_config = engine_config(block_size=BS, enable_prefix_caching=False, max_num_batched_tokens=128)
    vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
    register_eviction_block_manager()
    kv_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layer.0"], eviction_spec(BUDGET, BS))])
    scheduler = scheduler_cls(vllm_config, kv_config, StructuredOutputManager(vllm_config), block_size=BS)
    manager, pool = scheduler.kv_cache_manager, scheduler.kv_cache_manager.block_pool
    requests = {rid: Request(rid, list(range(p)), SamplingParams(max_tokens=6, ignore_eos=True), None)
                for rid, p in PROMPTS.items()}
    for request in requests.values():
        scheduler.add_request(request)

    completed_at, freed_at, in_flight = {}, {}, []
    for step in range(40):
        output = scheduler.schedule()
        for rid, request in requests.items():
            blocks = request_blocks(manager, rid)
            if rid not in freed_at and any(b.is_null for b in blocks):
                freed_at[rid] = step
                kept = kept_prompt_blocks(PROMPTS[rid], BUDGET, BS)
                assert [b.is_null for b in blocks[: PROMPTS[rid] // BS]] == (
                    [False] * kept + [True] * (PROMPTS[rid] // BS - kept))
            if rid in output.num_scheduled_tokens and rid not in completed_at and (
                    request.num_computed_tokens >= PROMPTS[rid]):
                completed_at[rid] = step  # this step's forward completes the prompt and compacts it
        # the model's output: nothing sampled for a partial prefill chunk, one token otherwise
        in_flight.append((output, {rid: scheduler.requests[rid].is_prefill_chunk
                                   for rid in output.num_scheduled_tokens}))
        if len(in_flight) < lag:
            continue
        done, chunk = in_flight.pop(0)
        ids = list(done.num_scheduled_tokens)
        scheduler.update_from_output(done, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
            sampled_token_ids=[[] if chunk[rid] else [5] for rid in ids]))
        if all(r.is_finished() for r in requests.values()) and not scheduler.has_requests():
            break
    assert all(r.is_finished() for r in requests.values())
    assert {rid: freed_at[rid] - completed_at[rid] for rid in PROMPTS} == {rid: lag for rid in PROMPTS}
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1  # every block back (block 0 is the null block)
